"""Write the small test photos in tests/data/ (run once; the files are committed).

A drawn teddy (body, head, ears, muzzle) on four different backgrounds, at phone-like aspects (3:4 and 4:3),
with soft masks of the teddy in mask/. Drawn by this script, so they carry the repository's licence (MIT);
the tests must run from a clone alone, without the development machines' photo folder.

    python tools/make_test_photos.py
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "teddy"
SCENES = [  # (width, height, background, floor)
    (72, 96, (70, 130, 200), (200, 190, 170)),
    (96, 72, (60, 150, 70), (90, 70, 50)),
    (72, 96, (225, 222, 210), (150, 150, 160)),
    (96, 72, (190, 90, 70), (230, 210, 160)),
]
FUR, MUZZLE, EYE = (135, 90, 45), (210, 180, 140), (20, 15, 10)


def teddy(draw: ImageDraw.ImageDraw, cx: float, cy: float, scale: float, fur, muzzle, eye) -> None:
    s = scale
    draw.ellipse((cx - 16 * s, cy - 2 * s, cx + 16 * s, cy + 30 * s), fill=fur)       # body
    draw.ellipse((cx - 22 * s, cy + 8 * s, cx - 10 * s, cy + 20 * s), fill=fur)      # arms
    draw.ellipse((cx + 10 * s, cy + 8 * s, cx + 22 * s, cy + 20 * s), fill=fur)
    draw.ellipse((cx - 15 * s, cy - 30 * s, cx - 3 * s, cy - 18 * s), fill=fur)      # ears
    draw.ellipse((cx + 3 * s, cy - 30 * s, cx + 15 * s, cy - 18 * s), fill=fur)
    draw.ellipse((cx - 13 * s, cy - 26 * s, cx + 13 * s, cy + 0 * s), fill=fur)      # head
    if muzzle is not None:
        draw.ellipse((cx - 6 * s, cy - 12 * s, cx + 6 * s, cy - 3 * s), fill=muzzle)
        draw.ellipse((cx - 7 * s, cy - 19 * s, cx - 4 * s, cy - 16 * s), fill=eye)
        draw.ellipse((cx + 4 * s, cy - 19 * s, cx + 7 * s, cy - 16 * s), fill=eye)


def main() -> None:
    rng = random.Random(0)
    (OUT / "mask").mkdir(parents=True, exist_ok=True)
    for index, (w, h, background, floor) in enumerate(SCENES):
        photo = Image.new("RGB", (w, h), background)
        draw = ImageDraw.Draw(photo)
        draw.rectangle((0, int(h * 0.7), w, h), fill=floor)
        for _ in range(40):  # a little texture, so backgrounds are not flat
            x, y = rng.randrange(w), rng.randrange(h)
            tone = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in background)
            draw.point((x, y), fill=tone)
        cx, cy, scale = w / 2 + rng.uniform(-6, 6), h / 2 + rng.uniform(-2, 4), min(w, h) / 80
        teddy(draw, cx, cy, scale, FUR, MUZZLE, EYE)
        mask = Image.new("L", (w, h), 0)
        teddy(ImageDraw.Draw(mask), cx, cy, scale, 255, None, None)
        photo.save(OUT / f"{index}.png", optimize=True)
        mask.filter(ImageFilter.GaussianBlur(1.0)).save(OUT / "mask" / f"{index}.png", optimize=True)


if __name__ == "__main__":
    main()
