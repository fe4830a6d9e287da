"""Rendering inside a node: the training's validation images and the gate sweep's cells."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..perfusion_ops import host

PREVIEW_SIZE = 512  # the longest side of a preview sent to the editor (what ComfyUI's own previews use)


def encode(clip, text: str):
    """Conditioning of `text`, as CLIP Text Encode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def render(model, vae, positive, negative, latent_image: torch.Tensor, seed: int, steps: int, cfg: float,
           sampler_name: str, scheduler: str) -> torch.Tensor:
    """Images [B, H, W, 3] sampled from `latent_image` and decoded, without gradients (a training may be
    running around it)."""
    with torch.no_grad():
        samples = host.sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image)
        return vae.decode(samples)[..., :3]


def empty_latent(width: int, height: int) -> torch.Tensor:
    """What Empty Latent Image gives for one image (the sampler adapts its channels to the model)."""
    return torch.zeros([1, 4, height // 8, width // 8])


def preview(image: torch.Tensor) -> tuple:
    """A progress-bar preview (ComfyUI's (format, PIL image, max size) triple) of one image [H, W, 3]."""
    pixels = (image.clamp(0, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
    return "JPEG", Image.fromarray(pixels), PREVIEW_SIZE
