"""A TAESD that keeps more of each 8x8 patch than its colour mean (issue 20, item 2; REPORT.md §9).

Encoder, set by hand: each of the 4 latent channels is a learned linear function of the patch's 8x8x3 values
(shape.py's "4 learned channels per 8x8 patch", which carried shape far better than the colour means alone or
with one learned channel beside them). A TAESD encoder computes any linear function of each 8x8 patch exactly
with these weights: conv(3, 64) copies RGB; each stride-2 convolution moves the four pixels of every 2x2 block
into channels of their own (space to depth: 3 -> 12 -> 48 channels), every residual Block is switched off (its
ReLUs see only non-negative values, since pixels are); the third stride-2 convolution writes the positive and
the negative part of each filter's sum to separate channels (both non-negative), and the last convolution
subtracts them and adds the bias.

Decoder: TAESD's own, learned. Training starts from the mosaic TAESD (base_model.mosaic_taesd: filters 0-2 the
colour means / 4, filter 3 small and random; the mosaic decoder plus small random weights) and learns the four
filters (a stride-8 8x8 convolution) with the decoder, on L1 reconstruction of world scenes with random looks
(never the held-out concepts), object pixels weighted OBJECT_WEIGHT times the background's: objects cover a
small part of each scene, and their outlines are what the mosaic loses. The trained filters are then written
into the hand-set encoder.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

log = logging.getLogger(__name__)

PATCH = 8
MEAN_SCALE = 0.25  # channels 0-2 hold RGB mean / 4, so the decoder's input clamp tanh(x/3)*3 stays near linear
OBJECT_WEIGHT = 5.0
_UNIT = MEAN_SCALE / PATCH ** 2  # a mean filter's entry: the unit the trained filters are parametrised in


def mean_filters() -> torch.Tensor:
    """The mosaic TAESD's filters of latent channels 0-2: each colour's patch mean / 4, [3, 3, 8, 8]."""
    filters = torch.zeros(3, 3, PATCH, PATCH)
    for c in range(3):
        filters[c, c] = MEAN_SCALE / PATCH ** 2
    return filters


def _stage3_tap(c: int, y: int, x: int) -> tuple[int, int, int]:
    """Where pixel (y, x) of colour c of a patch reaches the third stride-2 convolution: (input channel, kernel row,
    kernel column). Row y = 4 a3 + 2 a2 + a1 (columns alike): stage 1 puts (a1, b1) in channel 4c + 2a1 + b1,
    stage 2 puts (a2, b2) of that in 4 (4c + 2a1 + b1) + 2a2 + b2, and stage 3 reads (a3, b3) at tap (1 + a3, 1 + b3)."""
    a1, a2, a3 = y & 1, (y >> 1) & 1, y >> 2
    b1, b2, b3 = x & 1, (x >> 1) & 1, x >> 2
    return 4 * (4 * c + 2 * a1 + b1) + 2 * a2 + b2, 1 + a3, 1 + b3


def set_patch_encoder(encoder: torch.nn.Sequential, filters: torch.Tensor, bias: torch.Tensor) -> None:
    """Set a TAESD encoder's weights so that latent channel f = conv2d(image, filters[f], stride 8) + bias[f]
    exactly (filters [4, 3, 8, 8]), for images in [0, 1]."""
    assert filters.shape == (4, 3, PATCH, PATCH), filters.shape
    with torch.no_grad():
        for p in encoder.parameters():
            p.zero_()
        for c in range(3):
            encoder[0].weight[c, c, 1, 1] = 1.0  # conv(3, 64): copy RGB
        # A stride-2 conv (kernel 3, padding 1) reads input row 2i + a at kernel row 1 + a, for a in {0, 1}.
        for c in range(3):  # stage 1: pixel (a1, b1) of each 2x2 block of colour c -> channel 4c + 2a1 + b1
            for a in (0, 1):
                for b in (0, 1):
                    encoder[2].weight[4 * c + 2 * a + b, c, 1 + a, 1 + b] = 1.0
        for k in range(12):  # stage 2: the same on the 12 channels -> channel 4k + 2a2 + b2
            for a in (0, 1):
                for b in (0, 1):
                    encoder[6].weight[4 * k + 2 * a + b, k, 1 + a, 1 + b] = 1.0
        # stage 3: channel 2f holds the positive part of filter f, channel 2f + 1 the negative part
        for c in range(3):
            for y in range(PATCH):
                for x in range(PATCH):
                    channel, row, column = _stage3_tap(c, y, x)
                    for f in range(4):
                        w = float(filters[f, c, y, x])
                        encoder[10].weight[2 * f + (w < 0), channel, row, column] = abs(w)
        for f in range(4):  # conv(64, 4): positive part minus negative part, plus the bias
            encoder[14].weight[f, 2 * f, 1, 1] = 1.0
            encoder[14].weight[f, 2 * f + 1, 1, 1] = -1.0
            encoder[14].bias[f] = float(bias[f])


def _start_decoder(decoder: torch.nn.Sequential, seed: int, noise: float = 0.1) -> None:
    """The mosaic decoder (base_model.mosaic_taesd) plus `noise` x PyTorch's default initialisation, so that every
    weight gets a gradient from the first step."""
    import base_model
    mosaic = base_model.mosaic_taesd().taesd_decoder.state_dict()
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in decoder.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.Conv2d.reset_parameters(m)
                m.weight.mul_(noise)
                if m.bias is not None:
                    m.bias.mul_(noise)
        for name, p in decoder.state_dict().items():
            p.add_(mosaic[name])


def start_filters(generator: torch.Generator) -> torch.Tensor:
    """The four filters a VAE's training starts from, in units of a mean filter's entry (MEAN_SCALE / 64):
    filters 0-2 the colour means, filter 3 random (the first draw of the training's generator, seeded with its
    seed)."""
    return torch.cat([mean_filters() / _UNIT, torch.randn(1, 3, PATCH, PATCH, generator=generator)])


def filter_movement(encoder, seed: int) -> list[float]:
    """How far each of a trained encoder's filters moved from where its training started (start_filters):
    |final - start| / |start| per filter. Training that barely moves them leaves the colour means (REPORT §9)."""
    filters, _ = read_filters(encoder)
    start = start_filters(torch.Generator().manual_seed(seed)) * _UNIT
    return [float((filters[f] - start[f]).norm() / start[f].norm()) for f in range(len(start))]


def train_patch_taesd(images: np.ndarray, masks: np.ndarray, steps: int, batch: int, lr: float, seed: int,
                      shape_labels: torch.Tensor | None = None, shape_weight: float = 0.0,
                      filter_lr: float | None = None):
    """The TAESD described above, trained on `images` [N, 48, 48, 3] whose objects cover `masks` [N, 48, 48];
    returns it and the losses (weighted L1). With shape_weight > 0, a shape classifier (the judges' network) reads
    the latent during training and its cross-entropy on `shape_labels` (-1: no single object) is added with that
    weight, so that the filters keep shape (reconstruction alone kept no more than the colour means, REPORT §9).
    filter_lr is the filters' own peak learning rate, in units of a mean filter's entry
    (default: lr): at lr 1e-3 Adam moves them by about 0.1% of an entry per step, and 1,500 steps left them within
    1-7% of their start (REPORT §9)."""
    from comfy.taesd.taesd import TAESD
    vae = TAESD()
    _start_decoder(vae.taesd_decoder, seed)
    # The encoder's four filters, in units of a mean filter's entry, so that Adam's steps (about the learning rate
    # per weight) change them by a share of their size.
    g = torch.Generator().manual_seed(seed)
    filters = torch.nn.Parameter(start_filters(g))  # the batches below follow its draw
    bias = torch.nn.Parameter(torch.zeros(4))
    decoder = vae.taesd_decoder.train()
    parameters = list(decoder.parameters()) + [bias]
    if shape_weight:
        import judges
        torch.manual_seed(seed)
        classifier = judges._Net(int(shape_labels.max()) + 1, in_channels=4).train()
        parameters += list(classifier.parameters())
        cross_entropy = torch.nn.CrossEntropyLoss(ignore_index=-1)
    filter_lr = filter_lr or lr
    opt = torch.optim.Adam([{"params": parameters, "lr": lr}, {"params": [filters], "lr": filter_lr}])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, filter_lr], total_steps=steps, pct_start=0.1)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    weight_all = 1.0 + (OBJECT_WEIGHT - 1.0) * torch.from_numpy(masks)[:, None]
    losses, start = [], time.time()
    for step in range(steps):
        index = torch.randint(len(x_all), (batch,), generator=g)
        x, weight = x_all[index], weight_all[index]
        latent = torch.nn.functional.conv2d(x, filters * _UNIT, bias, stride=PATCH)
        l1 = ((decoder(latent) - x).abs() * weight).mean() / weight.mean()
        loss = l1
        if shape_weight and (shape_labels[index] >= 0).any():
            loss = loss + shape_weight * cross_entropy(classifier(torch.nn.functional.interpolate(latent, scale_factor=PATCH)),
                                                       shape_labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(l1.item())
        if step % 100 == 0 or step == steps - 1:
            log.info("patch-code TAESD step %d/%d L1 %.4f (%.0f s)", step + 1, steps, np.mean(losses[-100:]),
                     time.time() - start)
    set_patch_encoder(vae.taesd_encoder, (filters * _UNIT).detach(), bias.detach())
    vae.vae_scale.data.fill_(1.0)
    vae.vae_shift.data.zero_()
    return vae.eval(), losses


def patch_latents(vae, images: np.ndarray) -> torch.Tensor:
    """What the hand-set encoder computes, directly: the four patch filters applied with stride 8 (float32)."""
    encoder = vae.taesd_encoder
    filters, bias = read_filters(encoder)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    return torch.nn.functional.conv2d(x, filters, bias, stride=PATCH)


def read_filters(encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The filters and bias a hand-set encoder (set_patch_encoder) applies, read back from its weights."""
    filters = torch.zeros(4, 3, PATCH, PATCH)
    with torch.no_grad():
        for c in range(3):
            for y in range(PATCH):
                for x in range(PATCH):
                    channel, row, column = _stage3_tap(c, y, x)
                    w = encoder[10].weight[:8, channel, row, column]
                    filters[:, c, y, x] = w[0::2] - w[1::2]
        return filters, encoder[14].bias.detach().clone()

