"""Perfusion together with other ComfyUI tools: ControlNet (stock nodes, a tiny ControlNet built with
ComfyUI's own classes). LoRA composition is checked in test_patch.py."""
from __future__ import annotations

import pytest
import torch

from reference import ProjectionProbe, random_concept, reference_projection, reference_settings, weights_of
from support.tiny_models import CPU, init_random, tiny_clip, tiny_model

pytestmark = pytest.mark.host


def tiny_controlnet(model, seed=0):
    """A ControlNet for `model`'s UNet config (as comfy.controlnet builds one from a checkpoint), random weights."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device=CPU)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    init_random(control_model, seed, std=0.2)  # zero convolutions too: an untrained ControlNet would do nothing
    return comfy.controlnet.ControlNet(control_model, load_device=CPU, manual_cast_dtype=None)


def sample_with(model, clip, controlnet, prompt, seed=0, size=8):
    """Sample through ComfyUI's sampler, with the stock ControlNetApplyAdvanced on both conditionings."""
    import comfy.sample
    import nodes
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    if controlnet is not None:
        hint = torch.rand(1, size * 8, size * 8, 3, generator=torch.Generator().manual_seed(7))
        positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, hint,
                                                                             1.0, 0.0, 1.0)
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", positive, negative, latent, seed=seed,
                               disable_pbar=True)


def test_concept_edit_stays_exact_under_a_controlnet_and_both_act():
    import comfy.patcher_extension
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    model, clip = tiny_model("sd1", std=0.2), tiny_clip("sd1")
    controlnet = tiny_controlnet(model)
    context = clip.encode_from_tokens(clip.tokenize("a photo of a teddy"))
    concept = random_concept(model, "sd1", "sks", seed=1, context=context)
    patched, patched_clip = apply_concepts(model, [concept]), clip_with_concepts(clip, [concept])
    prompt = "a photo of a embedding:sks"

    probed = patched.clone()
    probe = ProjectionProbe()
    probed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "zz_probe", probe)
    with_both = sample_with(probed, patched_clip, controlnet, prompt)
    assert torch.isfinite(with_both).all()

    # Every cross-attention projection of the UNet, in the last call, is the float64 reference edit.
    assert probe.records
    weights = weights_of(model)
    for (path, kind), (x, out) in probe.records.items():
        W = weights[(path, kind)]
        expected = reference_projection(W, x, reference_settings([(concept, 1.0, 0.70, 0.15)], path, kind, W))
        assert (out.double() - expected).norm() / expected.norm() < 1e-5, f"{path}.{kind}"

    # Both act: removing either one changes the result; the base model is untouched by all of it.
    base_before = sample_with(model, clip, None, "a photo of a teddy")
    assert not torch.allclose(with_both, sample_with(patched, patched_clip, None, prompt))
    assert not torch.allclose(with_both, sample_with(model, patched_clip, controlnet, prompt))
    assert torch.equal(sample_with(model, clip, None, "a photo of a teddy"), base_before)
