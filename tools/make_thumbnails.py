"""Write the template-browser thumbnails of the shipped workflows (workflows/<name>.jpg).

ComfyUI lists every custom node pack's workflows/*.json in the editor's template browser and asks for a
thumbnail next to each one at /api/workflow_templates/<pack>/<name>.jpg (frontend 1.27: JPEG, fixed). Without
it the browser shows broken images. The thumbnails are the editor screenshots that tests/test_editor.py takes
(docs/screenshots/<name>.png), scaled down. Run after those screenshots change:

    python tools/make_thumbnails.py
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
SCREENSHOTS = REPO / "docs" / "screenshots"
WIDTH = 640  # the template cards are about 300 px wide; twice that stays sharp on high-density screens
log = logging.getLogger("make_thumbnails")


def thumbnail_path(workflow: Path) -> Path:
    return workflow.with_suffix(".jpg")


def make_thumbnail(screenshot: Path, target: Path) -> None:
    with Image.open(screenshot) as image:
        image = image.convert("RGB")
        height = round(image.height * WIDTH / image.width)
        image.resize((WIDTH, height), Image.LANCZOS).save(target, "JPEG", quality=85, optimize=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    missing = []
    for workflow in sorted(WORKFLOWS.glob("*.json")):
        screenshot = SCREENSHOTS / f"{workflow.stem}.png"
        if not screenshot.is_file():
            missing.append(screenshot)
            continue
        make_thumbnail(screenshot, thumbnail_path(workflow))
        log.info("wrote %s", thumbnail_path(workflow).relative_to(REPO))
    if missing:
        log.error("no screenshot for: %s (run tests/test_editor.py first)", ", ".join(map(str, missing)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
