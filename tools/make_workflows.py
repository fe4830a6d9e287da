"""Write the shipped workflows (workflows/*.json) from the node definitions of a real ComfyUI, with this pack
loaded (support/shipped_workflows.py describes the graphs). Run after changing a node's inputs:

    python tools/make_workflows.py            # needs ComfyUI (found as the tests find it)
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # support/, after ComfyUI (support/__init__.py says why)
from support import comfy_host, shipped_workflows  # noqa: E402

log = logging.getLogger("make_workflows")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfy_host.boot(comfy_host.required_comfyui(REPO))
    info = shipped_workflows.node_definitions()
    shipped_workflows.WORKFLOWS.mkdir(exist_ok=True)
    for filename, build in shipped_workflows.BUILDERS.items():
        (shipped_workflows.WORKFLOWS / filename).write_text(json.dumps(build(info), indent=1) + "\n")
        log.info("wrote workflows/%s", filename)


if __name__ == "__main__":
    main()
