"""Training photos from a folder: crop/pad/squash geometry, masks paired by name, EXIF orientation, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from perfusion_ops.photos import PAD_GREY, PhotoError, fit_square, load_photo_folder


def _resized(image: torch.Tensor, size: int) -> torch.Tensor:
    """An independent resize: [C, H, W] to [C, size, size], bicubic with antialiasing, clamped."""
    return F.interpolate(image[None], size=(size, size), mode="bicubic", antialias=True)[0].clamp(0, 1)


def _striped(h: int, w: int) -> torch.Tensor:
    """[3, h, w]: a distinct value in every column and row, so any crop offset or stretch shows."""
    rows = torch.linspace(0, 1, h)[:, None].expand(h, w)
    cols = torch.linspace(0, 1, w)[None, :].expand(h, w)
    return torch.stack([rows, cols, (rows + cols) / 2])


def test_crop_takes_the_centred_square_and_keeps_the_aspect():
    portrait = _striped(96, 72)
    expected = _resized(portrait[:, 12:84, :], 48)  # the centred 72x72 square
    assert torch.allclose(fit_square(portrait, 48, "crop", PAD_GREY), expected, atol=1e-6)
    assert not torch.allclose(fit_square(portrait, 48, "squash", PAD_GREY), expected, atol=1e-2)


def test_squash_stretches_the_whole_photo():
    landscape = _striped(72, 96)
    assert torch.allclose(fit_square(landscape, 48, "squash", PAD_GREY), _resized(landscape, 48), atol=1e-6)


def test_pad_keeps_the_whole_photo_on_a_border_the_mask_leaves_out():
    landscape = torch.ones(3, 48, 96) * 0.9
    padded = fit_square(landscape, 96, "pad", PAD_GREY)
    assert torch.allclose(padded[:, 30:66], torch.full((3, 36, 96), 0.9), atol=1e-3)   # the photo, centred
    assert torch.allclose(padded[:, :20], torch.full((3, 20, 96), PAD_GREY), atol=1e-3)  # the border
    mask = fit_square(torch.ones(1, 48, 96), 96, "pad", 0.0)[0]
    assert mask[30:66].min() > 0.99 and mask[:20].max() < 0.01 and mask[-20:].max() < 0.01


def test_an_unknown_fit_is_refused():
    with pytest.raises(PhotoError, match="fit must be one of"):
        fit_square(torch.ones(3, 8, 8), 8, "stretch", PAD_GREY)


def _write(folder, names, size=(40, 30), masks=None):
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", size, (60 * index, 100, 150)).save(folder / name)
    if masks is not None:
        (folder / "mask").mkdir()
        for name in masks:
            mask = np.zeros(size[::-1], dtype=np.uint8)
            mask[:, : size[0] // 2] = 255  # the left half is the concept
            Image.fromarray(mask).save(folder / "mask" / name)


def test_masks_are_paired_by_name_and_get_the_photos_geometry(tmp_path):
    _write(tmp_path / "c", ["a.png", "b.jpg"], masks=["a.png", "b.png"])  # a mask may have another suffix
    images, masks, with_masks = load_photo_folder(tmp_path / "c", 32, "squash")
    assert with_masks and images.shape == (2, 32, 32, 3) and masks.shape == (2, 32, 32)
    assert masks[:, :, :14].min() > 0.95 and masks[:, :, 18:].max() < 0.05


def test_without_masks_the_mask_is_the_photo_area(tmp_path):
    _write(tmp_path / "c", ["a.png"], size=(40, 20))
    _, masks, with_masks = load_photo_folder(tmp_path / "c", 40, "pad")
    assert not with_masks
    assert masks[0, 12:28].min() > 0.99 and masks[0, :8].max() < 0.01
    _, masks, _ = load_photo_folder(tmp_path / "c", 40, "crop")
    assert torch.allclose(masks, torch.ones(1, 40, 40), atol=1e-5)


def test_photos_turned_by_exif_come_out_upright(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    upright = np.zeros((30, 20, 3), dtype=np.uint8)
    upright[:5] = 255  # a white band at the top of the upright photo
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # stored turned, as a phone does
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    stored.save(folder / "a.jpg", exif=exif, quality=100)
    images, _, _ = load_photo_folder(folder, 20, "squash")
    assert images[0, :3].mean() > 0.9 and images[0, -10:].mean() < 0.1


@pytest.mark.parametrize("case,message", [
    ("missing", "No folder"),
    ("empty", "No photos"),
    ("partial masks", "has no mask for ['b.png']"),
])
def test_unusable_folders_are_refused_clearly(tmp_path, case, message):
    folder = tmp_path / "c"
    if case == "empty":
        folder.mkdir()
    if case == "partial masks":
        _write(folder, ["a.png", "b.png"], masks=["a.png"])
    with pytest.raises(PhotoError) as error:
        load_photo_folder(folder, 32)
    assert message in str(error.value)


@pytest.mark.host
def test_the_load_photos_node_reads_a_folder_of_the_input_directory(tmp_path, monkeypatch):
    import folder_paths
    import nodes
    _write(tmp_path / "my_concept", ["a.png", "b.png"], masks=["a.png", "b.png"])
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda *a, **k: str(tmp_path))
    node = nodes.NODE_CLASS_MAPPINGS["PerfusionLoadPhotos"]
    options = node.INPUT_TYPES()["required"]["folder"]
    assert "my_concept" in str(options) and "my_concept/mask" not in str(options)
    output = node.execute("my_concept", 64, "crop")
    images, masks = output.args if hasattr(output, "args") else output.result
    assert images.shape == (2, 64, 64, 3) and masks.shape == (2, 64, 64)


@pytest.mark.parametrize("fit", ["crop", "pad", "squash"])
def test_a_batch_and_its_masks_are_fitted_alike(fit):
    """What the train node feeds the VAE (photos.fit_batch): each photo as fit_square makes it, its mask with the
    same geometry; with pad and no masks, a mask that leaves the border out of the loss."""
    from perfusion_ops.photos import fit_batch
    images = torch.stack([_striped(96, 72), _striped(96, 72).flip(1)]).movedim(1, -1)  # [2, 96, 72, 3]
    masks = images[..., 0].clone()
    fitted, fitted_masks = fit_batch(images, masks, 48, fit)
    assert fitted.shape == (2, 48, 48, 3) and fitted_masks.shape == (2, 48, 48)
    for n in range(2):
        assert torch.allclose(fitted[n], fit_square(images[n].movedim(-1, 0), 48, fit, PAD_GREY).movedim(0, -1))
        assert torch.allclose(fitted_masks[n], fit_square(masks[n][None], 48, fit, 0.0)[0])
    _, border_masks = fit_batch(images, None, 48, fit)
    if fit == "pad":
        assert border_masks[:, :, :5].max() == 0 and border_masks[:, 10:-10, 10:-10].min() > 0.99
    else:
        assert border_masks is None
    kept, kept_masks = fit_batch(images, masks, 0, fit)  # resolution 0: the photos' own scale
    assert kept.shape[1:3] == {"crop": (72, 72), "pad": (96, 96), "squash": (96, 72)}[fit]
