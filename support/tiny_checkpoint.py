"""A tiny SD1.5-format checkpoint that ComfyUI's stock CheckpointLoaderSimple loads, and placeholder photos.

For smoke runs, server tests and the editor test, where the graph must use the stock loader: the UNet is
the smallest one ComfyUI still detects as SD1.5 (model_channels 320, context_dim 768, one level), the text
encoder is SD1.5's own CLIP-L architecture (ComfyUI builds it from a fixed config), and the VAE is TAESD.
All weights are random: what it draws is noise. Needs ComfyUI booted (support.comfy_host).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .tiny_models import init_random

CPU = torch.device("cpu")
TINY_SD15_UNET = {
    "model_channels": 320, "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False, "use_checkpoint": False, "image_size": 32,
    "in_channels": 4, "out_channels": 4, "legacy": False, "use_spatial_transformer": True,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1],
}


def tiny_sd15_state_dict(seed: int = 0, unet_std: float = 0.02) -> dict[str, torch.Tensor]:
    """The state dict of a random tiny SD1.5-format checkpoint, in float16."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    from comfy.taesd.taesd import TAESD

    model_config = sm.SD15(dict(TINY_SD15_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=CPU)
    init_random(model.diffusion_model, seed, unet_std)

    clip = comfy.sd.CLIP(smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options={"dtype": torch.float32})
    init_random(clip.cond_stage_model, seed + 1)
    clip_sd = {k: v for k, v in clip.get_sd().items() if not k.endswith("position_ids")}

    vae = TAESD()
    init_random(vae, seed + 2, std=0.04)  # its convolutions skip initialisation too
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.zero_()
    vae_sd = vae.state_dict()

    # The checkpoint layout comes from the model config's own converters (BaseModel.state_dict_for_saving, which
    # calls them, takes the UNet's state dict as an argument on v0.33.0 and not on v0.3.64).
    state_dict = model_config.process_unet_state_dict_for_saving(model.diffusion_model.state_dict())
    state_dict.update(model_config.process_clip_state_dict_for_saving(clip_sd))
    state_dict.update(model_config.process_vae_state_dict_for_saving(vae_sd))
    return {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in state_dict.items()}


def write_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the checkpoint atomically (temporary name, then rename) and return its path."""
    import comfy.utils
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    comfy.utils.save_torch_file(tiny_sd15_state_dict(seed), str(temporary),
                                metadata={"perfusion.note": "tiny random SD1.5-format model; draws noise"})
    os.replace(temporary, path)
    return path


def write_placeholder_photos(folder: Path) -> None:
    """Four 64x64 photos of a brown blob on different backgrounds, for the smoke run (and tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image, ImageDraw
    backgrounds = [(40, 120, 200), (60, 160, 60), (220, 220, 210), (200, 80, 60)]
    for index, background in enumerate(backgrounds):
        image = Image.new("RGB", (64, 64), background)
        draw = ImageDraw.Draw(image)
        offset = 4 * index
        draw.ellipse((14 + offset, 18, 46 + offset, 56), fill=(120, 80, 40))
        draw.ellipse((18 + offset, 6, 40 + offset, 28), fill=(140, 95, 50))
        image.save(folder / f"{index}.png")
