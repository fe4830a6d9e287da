"""What the tests, the tools, the benchmarks and the toy world share: the ComfyUI host they run on
(`comfy_host`: find it, boot it, load the pack through ComfyUI's own loader), ComfyUI's executor in-process
(`comfy_runner`), the tiny models built with ComfyUI's own classes (`tiny_models`, `tiny_checkpoint`) and
UI-to-API workflow conversion (`workflow_api`). Not part of the pack: ComfyUI never imports it.

Import it as `from support import ...` with the repository root at the END of sys.path (after ComfyUI's
checkout, which `comfy_host.prepare` puts first), so the pack's `nodes/` folder never shadows ComfyUI's `nodes`.
"""
