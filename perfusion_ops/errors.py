"""The error every part of the pack raises when a user's input cannot be used."""


class PerfusionError(ValueError):
    """A concept, model, CLIP or setting that Perfusion cannot use; the message says why and what to do."""
