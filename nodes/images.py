"""Renders for the user to compare: one image with its caption under it, and captioned images on a grid."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CAPTION_SHARE = 0.09  # caption strip height, as a share of the image height
MIN_CAPTION = 14      # pixels: readable at any image size
MIN_FONT = 6          # pixels: the smallest caption text, for images too narrow for their caption


def captioned(image: torch.Tensor, text: str) -> torch.Tensor:
    """`image` [H, W, 3] (0..1) with a black strip under it that says `text` in white."""
    height, width = image.shape[:2]
    strip = max(MIN_CAPTION, round(height * CAPTION_SHARE))
    canvas = Image.new("RGB", (width, strip))
    size = strip - 4
    font = ImageFont.load_default(size=size)
    if font.getlength(text) > width - 6:  # smaller, to fit the width (narrow images)
        font = ImageFont.load_default(size=max(MIN_FONT, int(size * (width - 6) / font.getlength(text))))
    ImageDraw.Draw(canvas).text((3, strip // 2), text, fill="white", font=font, anchor="lm")
    caption = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).to(image.device, image.dtype)
    return torch.cat([image[..., :3], caption], dim=0)


def grid(images: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Same-sized images [H, W, 3] on a grid, row by row, as a batch of one [1, rows H, columns W, 3]; empty
    places (a last row that is not full) stay black."""
    height, width = images[0].shape[:2]
    rows = -(-len(images) // columns)
    sheet = torch.zeros(rows * height, columns * width, 3, dtype=images[0].dtype, device=images[0].device)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        sheet[row * height:(row + 1) * height, column * width:(column + 1) * width] = image[..., :3]
    return sheet[None]
