"""Tiny, randomly initialised SD1.x / SD2.x / SDXL models built with ComfyUI's own classes.

Same code paths as real checkpoints (supported_models -> BaseModel -> ModelPatcher, comfy.sd.CLIP with
ComfyUI's tokenizer files, comfy.sd.VAE), at a size the CPU samples in milliseconds.
"""
from __future__ import annotations

import torch

CPU = torch.device("cpu")
ARCHS = ("sd1", "sd2", "sdxl")

UNET_CONFIGS = {
    "sd1": {"model_channels": 32, "context_dim": 768, "use_linear_in_transformer": False,
            "transformer_depth": [1, 1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1],
            "adm_in_channels": None},
    "sd2": {"model_channels": 64, "context_dim": 1024, "use_linear_in_transformer": True,
            "transformer_depth": [1, 1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1],
            "adm_in_channels": None},
    "sdxl": {"model_channels": 64, "context_dim": 2048, "use_linear_in_transformer": True,
             "transformer_depth": [0, 2], "transformer_depth_middle": 2, "transformer_depth_output": [0, 0, 2, 2],
             "adm_in_channels": 2816, "num_classes": "sequential"},
}
COMMON_UNET = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "legacy": False,
               "use_spatial_transformer": True, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
               "use_temporal_attention": False, "use_temporal_resblock": False}
TINY_TEXT_ENCODER = {"num_hidden_layers": 3, "intermediate_size": 128, "num_attention_heads": 4}


def init_random(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """ComfyUI's ops skip weight initialisation; give every parameter a seeded random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tiny_model(arch: str, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32):
    """A ModelPatcher over a tiny UNet of `arch`, its weights and computation in `dtype` (as ComfyUI loads SD1.x/SDXL
    UNets in float16 or bfloat16 on GPUs); the same seed gives the same weights, rounded to `dtype`."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    config_class = {"sd1": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL}[arch]
    model_config = config_class({**COMMON_UNET, **UNET_CONFIGS[arch]})
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=CPU)
    init_random(model.diffusion_model, seed, std)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def tiny_clip(arch: str, seed: int = 0, embedding_directory=None, dtype: torch.dtype = torch.float32):
    """A comfy.sd.CLIP with tiny text encoders of `arch` and ComfyUI's real tokenizers, in `dtype`."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base as smb
    from comfy.text_encoders import sd2_clip
    if arch == "sd1":
        target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        options = {"clip_l_model_config": {**TINY_TEXT_ENCODER, "hidden_size": 768}}
    elif arch == "sd2":
        target = smb.ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel)
        options = {"clip_h_model_config": {**TINY_TEXT_ENCODER, "hidden_size": 1024}}
    else:
        target = smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        options = {"clip_l_model_config": {**TINY_TEXT_ENCODER, "hidden_size": 768},
                   "clip_g_model_config": {**TINY_TEXT_ENCODER, "hidden_size": 1280}}
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory,
                         model_options={"dtype": dtype, **options})
    init_random(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 0):
    """A comfy.sd.VAE with a small AutoencoderKL (8x downscale, 4 latent channels)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    params = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                           "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                           "attn_resolutions": [], "dropout": 0.0}}
    autoencoder = AutoencoderKL(**params)
    init_random(autoencoder, seed)
    return comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": params}, device=CPU, dtype=torch.float32)


class TinyCheckpointLoader:
    """Test-only node: a tiny model, CLIP and VAE of the chosen architecture (like CheckpointLoaderSimple)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"arch": (list(ARCHS),), "seed": ("INT", {"default": 0}),
                             "weight_std": ("FLOAT", {"default": 0.02, "step": 0.01})},
                "optional": {"dtype": (list(DTYPES), {"default": "float32"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, arch, seed, weight_std, dtype="float32"):
        dtype = DTYPES[dtype]
        return (tiny_model(arch, seed, weight_std, dtype), tiny_clip(arch, seed, embedding_directory=[], dtype=dtype),
                tiny_vae(seed))


def register_test_nodes() -> None:
    import nodes
    nodes.NODE_CLASS_MAPPINGS["PerfusionTestTinyCheckpoint"] = TinyCheckpointLoader


def sample(model, clip, prompt: str, seed: int = 0, steps: int = 2, size: int = 16, negative: str = "",
           cfg: float = 5.0, sampler: str = "euler") -> torch.Tensor:
    """Sample a latent with ComfyUI's own sampler, the way KSampler does."""
    import comfy.sample
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    negative_cond = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative_cond, latent,
                               seed=seed, disable_pbar=True)
