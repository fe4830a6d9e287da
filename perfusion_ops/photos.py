"""Training photos: a folder of photos (and optional masks) to one square batch.

Photos of any size and aspect (phone photos are 3:4) become `size`² squares by one of three fits:
- crop: the largest centred square, then resized (the default: nothing is squashed, the edges are lost);
- pad: the whole photo, resized to fit, on a mid-grey border that its mask marks as not the concept;
- squash: the whole photo, resized to a square regardless of aspect (the reference recipe's resize).
A mask gets the same geometry as its photo; without masks, the mask is 1 on the photo and 0 on any padding.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

FITS = ("crop", "pad", "squash")
DEFAULT_FIT = "crop"  # non-square photos keep their aspect
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_FOLDER = "mask"
PAD_GREY = 0.5


class PhotoError(ValueError):
    """The photo folder cannot be used; the message says why."""


def fit_square(image: torch.Tensor, size: int, fit: str, fill: float) -> torch.Tensor:
    """[C, H, W] in 0..1 to [C, size, size] by `fit` (see the module's docstring); `fill` is the padding value."""
    if fit not in FITS:
        raise PhotoError(f"fit must be one of {FITS}, got '{fit}'.")
    _, h, w = image.shape
    if fit == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[:, top:top + side, left:left + side]
    elif fit == "pad":
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        image = F.pad(image, (left, side - w - left, top, side - h - top), value=fill)
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", align_corners=False,
                            antialias=True)[0]
    return resized.clamp(0, 1)


def fit_batch(images: torch.Tensor, masks, resolution: int, fit: str):
    """[B, H, W, C] images and optional [B, H, W] masks made square the same way (fit_square): `crop`
    the centred square, `pad` a grey border that the masks (all ones when none were given) leave out of the
    loss, `squash` stretched as the reference recipe does. Resolution 0 keeps the photos' scale."""
    if fit == "squash" and resolution <= 0:
        return images, masks
    _, h, w, _ = images.shape
    size = resolution if resolution > 0 else (min(h, w) if fit == "crop" else max(h, w))
    if masks is None and fit == "pad" and h != w:
        masks = torch.ones(images.shape[:3])
    fitted = torch.stack([fit_square(image.movedim(-1, 0), size, fit, PAD_GREY).movedim(0, -1) for image in images])
    if masks is not None:
        masks = torch.stack([fit_square(mask[None].float(), size, fit, 0.0)[0] for mask in masks])
    return fitted, masks


def read_image(path: Path) -> torch.Tensor:
    """A photo as [3, H, W] in 0..1, turned upright by its EXIF orientation (as phones store them)."""
    import numpy as np
    from PIL import Image, ImageOps
    with Image.open(path) as img:
        rgb = ImageOps.exif_transpose(img).convert("RGB")
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).movedim(-1, 0)


def read_mask(path: Path) -> torch.Tensor:
    """A mask as [1, H, W] in 0..1 (white = the concept), upright like its photo."""
    import numpy as np
    from PIL import Image, ImageOps
    with Image.open(path) as img:
        gray = ImageOps.exif_transpose(img).convert("L")
        return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None]


def load_photo_folder(folder: Path, size: int, fit: str = DEFAULT_FIT) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Photos of `folder` as IMAGE [N, size, size, 3] and masks as MASK [N, size, size], and whether masks were
    found. Masks live in `folder/mask/` under the photos' file names (any image suffix); either every photo has
    one or none does."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"No folder {folder}.")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise PhotoError(f"No photos ({', '.join(PHOTO_SUFFIXES)}) in {folder}.")
    mask_files = {}
    if (folder / MASK_FOLDER).is_dir():
        found = {p.stem: p for p in (folder / MASK_FOLDER).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES}
        missing = [p.name for p in photos if p.stem not in found]
        if missing and len(missing) < len(photos):
            raise PhotoError(f"{folder / MASK_FOLDER} has no mask for {missing}: give every photo a mask of the "
                             "same name, or remove the mask folder.")
        mask_files = {p.stem: found[p.stem] for p in photos if p.stem in found}
    images, masks = [], []
    for photo in photos:
        image = read_image(photo)
        if photo.stem in mask_files:
            mask = read_mask(mask_files[photo.stem])
            if mask.shape[-2:] != image.shape[-2:]:
                mask = F.interpolate(mask[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
        else:
            mask = torch.ones(1, *image.shape[-2:])
        images.append(fit_square(image, size, fit, fill=PAD_GREY))
        masks.append(fit_square(mask, size, fit, fill=0.0)[0])
    return torch.stack(images).movedim(1, -1), torch.stack(masks), bool(mask_files)
