"""Perfusion for ComfyUI: key-locked rank-one concept editing (Tewel et al., SIGGRAPH 2023).

ComfyUI imports this file and calls `comfy_entrypoint` (the V3 node API). Outside ComfyUI (tools,
tests of the math) nothing is registered and `perfusion_ops` imports without the host.
"""
# The editor's help pages of the nodes (web/docs/<NodeId>.md, shown in the node library), served by ComfyUI
# under /extensions/<this folder's name>/.
WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension  # noqa: F401  (only present inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes import PerfusionExtension

    async def comfy_entrypoint() -> PerfusionExtension:
        return PerfusionExtension()
