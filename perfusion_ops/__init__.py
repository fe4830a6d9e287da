"""The Perfusion method: math, model patching, concept files, covariance and training.

Importable without ComfyUI; the modules that touch ComfyUI objects import it only where they use it.
"""
