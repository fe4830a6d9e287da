"""Training precision: what the learned tensors and the loss are computed in, whatever dtype ComfyUI loaded
the model in.

The concept's tensors, the optimizer state and the loss are float32. The UNet and the text encoder run in their
own dtype. In float16 the backward pass through them underflows: the gradient of the masked ε-MSE is about
2·(ε̂−ε)·m²/N per element, ~3e-5 at 512² and batch 4, below float16's smallest normal number (6.1e-5), so much of
what reaches the word vector and the value targets is flushed to zero. Dynamic loss scaling (as
torch.amp.GradScaler does) multiplies the loss by a large factor S before the backward pass and divides the
float32 gradients by S after it; a step whose gradients overflowed is skipped and S halved, and S doubles after
`growth_interval` good steps. bfloat16 has float32's range, so it needs no scaling.
"""
from __future__ import annotations

import math

import torch


class LossScale:
    """Dynamic loss scaling for one training run (a no-op when `enabled` is False)."""

    def __init__(self, enabled: bool, initial: float = 2.0 ** 16, growth_interval: int = 100):
        self.enabled = enabled
        self.scale = initial if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscaled(self, grads) -> list[torch.Tensor]:
        """The float32 gradients of the unscaled loss."""
        return [g.float() / self.scale for g in grads]

    def update(self, grads) -> bool:
        """After a step's backward passes: True when its (unscaled) gradients are finite and the step may be
        taken; adjusts the scale."""
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not self.enabled:
            return finite
        if not finite:
            self.scale /= 2.0
            self.good_steps = 0
            self.skipped += 1
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0 and math.isfinite(self.scale * 2.0):
            self.scale *= 2.0
        return True


def describe(dtype: torch.dtype, loss_scale: LossScale) -> str:
    """What the node shows: the precision the model runs in and how training copes with it."""
    name = str(dtype).removeprefix("torch.")
    if loss_scale.enabled:
        return f"model in {name}, concept in float32, dynamic loss scaling"
    return f"model in {name}, concept in float32"


def loss_scale_for(dtype: torch.dtype, enabled: bool = True) -> LossScale:
    """Loss scaling exactly when the model computes in float16 (and `enabled`, which tests turn off as a control)."""
    return LossScale(enabled and dtype == torch.float16)
