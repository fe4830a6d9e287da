"""The base text-to-image model of the toy world, built from ComfyUI's own classes and saved as an SD1.5-format
checkpoint that the stock CheckpointLoaderSimple loads.

- Text encoder: SD1.5's fixed CLIP-L (12 layers, 768 wide), frozen and never trained. Its token and position
  embeddings are random (std 0.02 and 0.005) and every layer's output projections (self_attn.out_proj,
  mlp.fc2) are zero, so each layer adds exactly nothing to the residual stream: the context a word gets is
  LayerNorm(token + position embedding), a context-free code of the word (plus a little of its position).
  Why: training CLIP-L (123M parameters, ~6.5 GMAC per caption) on two CPU cores would cost more than the
  whole UNet, and a context-free encoder lets us compute every caption's context exactly without running it.
  The world's grammar is built for it: each attribute has its own words. ComfyUI still runs all 12 layers
  (exactly identity); `check_contexts` verifies that our shortcut equals what ComfyUI computes.
- VAE: TAESD format (comfy.taesd.taesd.TAESD, 8x downscale, 4 channels) with hand-set weights: 8x8 patch
  colour means, decoded as mosaics (see mosaic_taesd). vae_scale / vae_shift are set so that the UNet's
  latents (x 0.18215, SD1.5's latent format) have zero mean and unit variance.
- UNet: SD1.5 detection needs model_channels 320 and context_dim 768; one level, one
  ResBlock, no middle block, 3 cross-attention layers, on 6x6 latents (48x48 images). Trained from scratch with ComfyUI's own model
  (BaseModel.apply_model) and its own discrete EPS noise schedule, so KSampler samples what it learned.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

log = logging.getLogger(__name__)
CPU = torch.device("cpu")

UNET_CONFIG = {
    "model_channels": 320, "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False, "use_checkpoint": False, "image_size": 6,
    "in_channels": 4, "out_channels": 4, "legacy": False, "use_spatial_transformer": True,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_middle": -2,
    "transformer_depth_output": [1, 1],
}


def _default_init(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops skip initialisation; use PyTorch's own defaults, seeded."""
    torch.manual_seed(seed)
    for m in module.modules():
        for cls in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, cls):
                cls.reset_parameters(m)
                break


# ----------------------------------------------------------------------------------------------------------
# Text encoder


def build_clip(seed: int):
    """A comfy.sd.CLIP (SD1.5's CLIP-L) with the frozen, context-free weights described above."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base as smb
    clip = comfy.sd.CLIP(smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options={"dtype": torch.float32})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if name.endswith("position_embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.005)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias") or "out_proj" in name or "fc2" in name:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            p.copy_(p.half().float())  # what the checkpoint stores (float16)
    return clip


def shortcut_covariance(clip, captions, covariance_module):
    """What the pack's covariance.estimate_covariance computes for this context-free CLIP (C = Σ x xᵀ / N over
    BOS..EOS of every caption's first chunk), through ContextEncoder instead of 12 transformer layers."""
    encoder = ContextEncoder(clip)
    end = clip.tokenizer.clip_l.end_token
    C, count = torch.zeros(768, 768, dtype=torch.float64), 0
    for caption in captions:
        ids = [int(t) for t, *_ in clip.tokenize(caption)["l"][0]]
        length = covariance_module._content_length([(i, 1.0) for i in ids], end)
        x = encoder(torch.tensor([ids]))[0, :length].double()
        C += x.T @ x
        count += length
    return C / count


class ContextEncoder:
    """Exactly the context ComfyUI's CLIP gives, computed as LayerNorm(token + position) from token ids."""

    def __init__(self, clip):
        text_model = clip.cond_stage_model.clip_l.transformer.text_model
        self.tokens = text_model.embeddings.token_embedding.weight.detach().float().clone()
        self.positions = text_model.embeddings.position_embedding.weight.detach().float().clone()
        norm = text_model.final_layer_norm
        self.norm_weight, self.norm_bias, self.eps = norm.weight.detach().float(), norm.bias.detach().float(), norm.eps
        self.clip = clip

    def token_ids(self, caption: str) -> list[int]:
        chunk = self.clip.tokenize(caption)["l"][0]
        if len(self.clip.tokenize(caption)["l"]) != 1:
            raise ValueError(f"caption longer than one 77-token chunk: {caption!r}")
        return [int(t) for t, _ in chunk]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens[ids] + self.positions[None, : ids.shape[1]]
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias, self.eps)


def check_contexts(clip, captions) -> float:
    """Largest difference between our shortcut and ComfyUI's own encoding (must be ~0)."""
    encoder = ContextEncoder(clip)
    worst = 0.0
    with torch.no_grad():
        for caption in captions:
            ours = encoder(torch.tensor([encoder.token_ids(caption)]))
            theirs = clip.encode_from_tokens(clip.tokenize(caption)).float()
            worst = max(worst, float((ours - theirs).abs().max()))
    return worst


# ----------------------------------------------------------------------------------------------------------
# VAE


def mosaic_taesd():
    """A TAESD whose weights are set by hand, not learned: the encoder averages each 8x8 patch (three stride-2
    convolutions that average 2x2, every residual Block switched off) and writes its RGB mean into latent
    channels 0-2 (scaled by 1/4, so the decoder's input clamp tanh(x/3)*3 stays linear to 0.2%); channel 3 is 0.
    The decoder undoes the scale and upsamples (nearest) back: decoded images are colour mosaics of 8x8 blocks.
    Why: a TAESD trained from scratch for 800 steps (batch 16, ~36 min on the shared CPUs) reconstructed only
    the backgrounds (L1 0.075); this one costs nothing and keeps colour and layout at the latent's resolution."""
    from comfy.taesd.taesd import TAESD
    vae = TAESD()
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        enc, dec = vae.taesd_encoder, vae.taesd_decoder
        for c in range(3):
            enc[0].weight[c, c, 1, 1] = 1.0                     # conv(3, 64): copy RGB
            for i in (2, 6, 10):                                # stride-2 convs: mean of each 2x2
                enc[i].weight[c, c, 1:3, 1:3] = 0.25
            enc[14].weight[c, c, 1, 1] = 0.25                   # conv(64, 4): RGB / 4
            dec[1].weight[c, c, 1, 1] = 4.0                     # conv(4, 64): back to RGB
            for i in (7, 12, 17):                               # conv after each upsampling: identity
                dec[i].weight[c, c, 1, 1] = 1.0
            dec[19].weight[c, c, 1, 1] = 1.0                    # conv(64, 3)
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.zero_()
    return vae.eval()


def mosaic_latents(images: np.ndarray) -> torch.Tensor:
    """What mosaic_taesd's encoder computes (8x8 patch means / 4; channel 3 zero), directly and in float32."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    rgb = torch.nn.functional.avg_pool2d(x, 8) / 4
    return torch.cat([rgb, torch.zeros_like(rgb[:, :1])], dim=1)


@torch.no_grad()
def _in_batches(fn, images: np.ndarray, batch: int) -> torch.Tensor:
    """fn over [N, H, W, 3] images in channel-first batches, under CPU bfloat16 autocast; results in float32."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(fn(x).float())
    return torch.cat(out)


def raw_latents(vae, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    return _in_batches(vae.taesd_encoder, images, batch)


def set_latent_statistics(vae, raw: torch.Tensor, latent_scale: float = 0.18215) -> None:
    """vae_scale / vae_shift such that latent_scale * VAE latent = (raw - mean) / std for the UNet."""
    mean, std = float(raw.mean()), float(raw.std())
    with torch.no_grad():
        vae.vae_scale.fill_(latent_scale * std)
        vae.vae_shift.fill_(-mean / (latent_scale * std))


def reconstruct(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    decoded = _in_batches(lambda x: vae.taesd_decoder(vae.taesd_encoder(x)), images, batch)
    return decoded.clamp(0, 1).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------------------
# UNet


def build_unet_model(seed: int):
    """comfy.model_base.BaseModel (SD15 config) with a freshly initialised UNet."""
    import comfy.supported_models as sm
    config = sm.SD15(dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=CPU)
    _default_init(model.diffusion_model, seed)
    return model


def train_unet(model, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor, contexts: ContextEncoder,
               steps: int, batch: int, seed: int, lr: float = 3e-4, uncond_rate: float = 0.1, ema_decay: float = 0.999,
               log_every: int = 50):
    """ε-prediction training through ComfyUI's BaseModel.apply_model and its discrete noise schedule.
    `latents` are VAE latents [N, 4, 6, 6]; `ids` caption token ids [N, 77]. Returns (EMA state dict, losses)."""
    unet = model.diffusion_model
    sampling = model.model_sampling
    params = [p for p in unet.parameters()]
    for p in params:
        p.requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    g = torch.Generator().manual_seed(seed)
    x0_all = model.process_latent_in(latents.float())
    losses, start = [], time.time()
    unet.train()
    for step in range(steps):
        index = torch.randint(len(x0_all), (batch,), generator=g)
        x0 = x0_all[index]
        batch_ids = ids[index].clone()
        drop = torch.rand(batch, generator=g) < uncond_rate
        batch_ids[drop] = empty_ids
        context = contexts(batch_ids)
        t = torch.randint(0, 1000, (batch,), generator=g).float()
        sigma = sampling.sigma(t)
        noise = torch.randn(x0.shape, generator=g)
        xt = sampling.noise_scaling(sigma, noise, x0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            denoised = model.apply_model(xt, sigma, c_crossattn=context)
        eps = (xt - denoised.float()) / sigma.view(-1, 1, 1, 1)
        loss = (eps - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            log.info("UNet step %d/%d loss %.4f (%.0f s)", step + 1, steps, recent, time.time() - start)
    unet.eval()
    for p in params:
        p.requires_grad_(False)
    return ema, losses


def save_checkpoint(path, model, ema_state: dict, clip, vae) -> None:
    """An SD1.5-format checkpoint: UNet (EMA weights) and VAE in float32, CLIP in float16."""
    import comfy.utils
    model.diffusion_model.load_state_dict(ema_state)
    clip_sd = {k: v.half() for k, v in clip.get_sd().items() if not k.endswith("position_ids")}
    vae_sd = {k: v.float() for k, v in vae.state_dict().items()}
    state = model.state_dict_for_saving(clip_sd, vae_sd)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    tmp = str(path) + ".partial"
    comfy.utils.save_torch_file(state, tmp, metadata={"toy_world": "base model of experiments/toy_world"})
    import os
    os.replace(tmp, path)
