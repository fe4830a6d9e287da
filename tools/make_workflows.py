"""Write the shipped workflows (workflows/*.json) from the node definitions of a real ComfyUI, with this pack
loaded (support/shipped_workflows.py describes the graphs). Run after changing a node's inputs, with both hosts:

    bash -c 'source tools/env.sh && "$venv/bin/python" tools/make_workflows.py'     # v0.3.64: all but SAM3's
    PERFUSION_HOST=current bash -c 'source tools/env.sh && "$venv/bin/python" tools/make_workflows.py'  # SAM3's

The workflows are written from the minimum host's node definitions, so that they load on every supported
host; those that need SAM3 (not in v0.3.64) from the current host's.
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
    buildable = shipped_workflows.buildable(info)
    on_sam3_host = set(buildable) == set(shipped_workflows.BUILDERS)
    for filename, build in buildable.items():
        if on_sam3_host and filename not in shipped_workflows.NEEDS_SAM3:
            continue  # written from the minimum host's definitions
        (shipped_workflows.WORKFLOWS / filename).write_text(json.dumps(build(info), indent=1) + "\n")
        log.info("wrote workflows/%s", filename)


if __name__ == "__main__":
    main()
