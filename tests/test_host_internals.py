"""Every ComfyUI internal the pack relies on (perfusion_ops/host.py), checked against the running host.

Each test names the internal in its failure message, so a ComfyUI update that changes one fails here, loudly,
instead of breaking the pack silently. Run against both supported hosts (tools/test.sh --host ...).
"""
from __future__ import annotations

import inspect

import pytest
import torch

from support.tiny_models import tiny_clip, tiny_model

pytestmark = pytest.mark.host


def test_diffusion_model_wrapper_key():
    import comfy.patcher_extension
    from perfusion_ops import host
    assert comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL == host.DIFFUSION_MODEL_WRAPPER, \
        "comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL changed"


def test_tokenizer_embedding_lookup_returns_the_embedding_first_and_the_leftover_last():
    """SDTokenizer._try_get_embedding: (embedding, leftover) on v0.3.64, (embedding, name, leftover) on v0.33.0."""
    clip = tiny_clip("sd1", embedding_directory=[])
    lookup = clip.tokenizer.clip_l._try_get_embedding
    result = lookup("nosuchembedding, and more")
    assert isinstance(result, tuple) and len(result) in (2, 3), \
        f"SDTokenizer._try_get_embedding returns {result!r}: expected (embedding, [name,] leftover)"
    assert result[0] is None and result[-1].endswith("and more"), f"SDTokenizer._try_get_embedding: {result!r}"


def test_our_lookup_keeps_the_hosts_tuple_and_resolves_our_names():
    from perfusion_ops import host
    clip = tiny_clip("sd1", embedding_directory=[])
    vector = torch.ones(1, 768)
    tokenizer = host.install_embedding_lookup(clip.tokenizer.clip_l, {"hugsy": vector})
    original = clip.tokenizer.clip_l._try_get_embedding("hugsy, on a table")
    ours = tokenizer._try_get_embedding("hugsy, on a table")
    assert len(ours) == len(original) and ours[0] is vector and ours[1:] == original[1:], (original, ours)
    assert tokenizer._try_get_embedding("other rest") == clip.tokenizer.clip_l._try_get_embedding("other rest")
    assert clip.tokenizer.clip_l.embedding_directory == [], "the original tokenizer was changed"


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_encoding_with_grad_is_what_the_clip_encodes_at_every_clip_skip(arch):
    """host.encode_with_grad repeats what comfy.sd.CLIP.encode_from_tokens does inside (clip options with the
    clip-skip layer, then encode_token_weights): same context and pooled output, and the positions of the
    word vectors in the prompt."""
    from perfusion_ops import host
    from perfusion_ops.text import clip_with_word_vectors
    clip = tiny_clip(arch)
    widths = {"sd1": {"clip_l": 768}, "sdxl": {"clip_l": 768, "clip_g": 1280}}[arch]
    word = {encoder: torch.randn(1, width, generator=torch.Generator().manual_seed(0)) for encoder, width in widths.items()}
    prompt = "a photo of embedding:hugsy on the beach"
    for layer in (None, -2):
        patched = clip_with_word_vectors(clip, {"hugsy": word}).clone()
        if layer is not None:
            patched.clip_layer(layer)
        expected, expected_pooled = patched.encode_from_tokens(patched.tokenize(prompt), return_pooled=True)
        context, pooled, positions = host.encode_with_grad(patched, prompt)
        assert torch.equal(context, expected), f"CLIP.encode_from_tokens changed (clip layer {layer})"
        assert torch.equal(pooled, expected_pooled), f"CLIP.encode_from_tokens' pooled output changed (layer {layer})"
        assert positions == [4], f"the word vector's position in the tokens changed: {positions}"


def test_loaded_models_list_and_unload():
    import comfy.model_management as mm
    assert isinstance(mm.current_loaded_models, list), "comfy.model_management.current_loaded_models is not a list"
    assert callable(getattr(mm.LoadedModel, "model_unload", None)), "comfy.model_management.LoadedModel.model_unload"
    from perfusion_ops import host
    model = tiny_model("sd1")
    mm.load_models_gpu([model])
    assert any(loaded.model is model for loaded in mm.current_loaded_models), "load_models_gpu did not list the model"
    host.unload(model)
    assert not any(loaded.model is model for loaded in mm.current_loaded_models), "host.unload left the model loaded"


def test_out_of_place_clip_layer_computes_what_comfys_clip_layer_computes():
    """host.make_clip_differentiable replaces comfy.clip_model.CLIPLayer.forward by an out-of-place copy: it must
    give the same numbers as the host's own forward (a changed CLIPLayer body fails here)."""
    import comfy.clip_model
    from perfusion_ops import host
    clip = tiny_clip("sd1")
    layer = next(m for m in clip.cond_stage_model.modules() if isinstance(m, comfy.clip_model.CLIPLayer))
    from comfy.ldm.modules.attention import optimized_attention_for_device
    attention = optimized_attention_for_device(torch.device("cpu"), mask=False, small_input=True)
    x = torch.randn(1, 5, 768, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = comfy.clip_model.CLIPLayer.forward(layer, x.clone(), None, attention)
        ours = host._out_of_place_clip_layer(layer, x.clone(), None, attention)
    assert torch.allclose(ours, expected, atol=1e-6), \
        "comfy.clip_model.CLIPLayer.forward changed: update host._out_of_place_clip_layer"
    assert set(inspect.signature(comfy.clip_model.CLIPLayer.forward).parameters) == \
        {"self", "x", "mask", "optimized_attention"}, "comfy.clip_model.CLIPLayer.forward's signature changed"


def test_weight_wrappers_reach_the_layers():
    """ModelPatcher.add_weight_wrapper fills each comfy.ops layer's weight_function when the model is loaded."""
    import comfy.model_management as mm
    from perfusion_ops import host
    model = tiny_model("sd1").clone()
    host.copy_inference_weights_at_use(model)  # no inference tensors here: nothing is wrapped
    calls = []
    model.add_weight_wrapper("diffusion_model.input_blocks.0.0.weight", lambda w: calls.append(1) or w)
    mm.load_models_gpu([model])
    try:
        layer = model.model.diffusion_model.input_blocks[0][0]
        assert layer.weight_function, "ModelPatcher.add_weight_wrapper no longer reaches comfy.ops' weight_function"
        layer(torch.zeros(1, 4, 8, 8))
        assert calls, "comfy.ops does not call weight_function at use"
    finally:
        host.unload(model)


def test_checkpointed_unet_layers_are_the_ones_the_unet_calls():
    """host.checkpoint_unet_blocks patches the layers inside input/middle/output blocks, which the UNet calls
    through openaimodel.forward_timestep_embed; a patch the UNet never calls would checkpoint nothing."""
    import comfy.model_management as mm
    from perfusion_ops import host
    model = tiny_model("sd1").clone()
    count = host.checkpoint_unet_blocks(model)
    assert count > 5
    called = []
    original = torch.utils.checkpoint.checkpoint
    try:
        torch.utils.checkpoint.checkpoint = lambda *a, **k: called.append(1) or original(*a, **k)
        mm.load_models_gpu([model])
        with torch.no_grad():
            model.model.apply_model(torch.zeros(1, 4, 8, 8), torch.ones(1), c_crossattn=torch.zeros(1, 77, 768))
    finally:
        torch.utils.checkpoint.checkpoint = original
        host.unload(model)
    assert len(called) == count, f"{len(called)} of {count} checkpointed UNet layers ran: " \
                                 "openaimodel.forward_timestep_embed no longer calls the layers"


def test_compute_dtype_and_progress_text():
    from perfusion_ops import host
    assert host.unet_compute_dtype(tiny_model("sd1", dtype=torch.float16).model) == torch.float16, \
        "BaseModel.manual_cast_dtype / get_dtype changed"
    from server import PromptServer
    assert callable(getattr(PromptServer, "send_progress_text", None)), "server.PromptServer.send_progress_text"


def test_the_stock_loader_detects_the_tiny_checkpoint_as_sd15(tmp_path):
    """support/tiny_checkpoint.py writes a checkpoint that comfy.sd.load_checkpoint_guess_config (the stock
    CheckpointLoaderSimple) detects as SD1.5 on this host, with its CLIP and VAE."""
    import comfy.sd
    import comfy.supported_models
    from support.tiny_checkpoint import write_tiny_checkpoint
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    assert type(model.model.model_config) is comfy.supported_models.SD15, type(model.model.model_config)
    assert clip is not None and vae is not None
    assert model.model.diffusion_model.input_blocks[0][0].out_channels == 320


def test_a_model_condition_from_the_text_encoder_reaches_the_diffusion_model():
    """host.TEXT_ENCODE is what comfy.sd.CLIP calls to encode, an object patch on the CLIP's patcher replaces it,
    and host.with_key_context's extra dict travels conditioning -> model_conds -> diffusion-model keyword."""
    import comfy.sample
    from perfusion_ops import host
    clip, model = tiny_clip("sd1"), tiny_model("sd1")
    original = clip.patcher.get_model_object(host.TEXT_ENCODE)
    assert callable(original), f"comfy.sd.CLIP's text model has no {host.TEXT_ENCODE}"
    marker = torch.full((1, 77, 768), 0.5)
    patched = clip.clone()
    patched.patcher.add_object_patch(host.TEXT_ENCODE, lambda tokens: host.with_key_context(original(tokens), marker))
    positive = patched.encode_from_tokens_scheduled(patched.tokenize("a photo"))
    assert host.KEY_CONTEXT in positive[0][1].get("model_conds", {}), \
        f"{host.TEXT_ENCODE}'s extra dict did not reach the conditioning (comfy.sd.CLIP.encode_from_tokens)"
    seen = []
    probe = model.clone()
    probe.add_wrapper_with_key(host.DIFFUSION_MODEL_WRAPPER, "probe",
                               lambda executor, *args, **kwargs: seen.append(kwargs.get(host.KEY_CONTEXT)) or executor(*args, **kwargs))
    latent = torch.zeros(1, 4, 8, 8)
    comfy.sample.sample(probe, latent, 1, 1.0, "euler", "normal", positive, positive, latent, disable_pbar=True)
    assert seen and seen[0] is not None and torch.equal(seen[0], marker), \
        "conditioning 'model_conds' did not reach the diffusion model as a keyword argument"
    assert torch.equal(clip.encode_from_tokens(clip.tokenize("a photo")), original(clip.tokenize("a photo"))[0]), \
        "the object patch leaked into the original CLIP"


def test_sample_is_what_the_ksampler_node_samples():
    """comfy.sample.fix_empty_latent_channels, prepare_noise and sample, as nodes.common_ksampler (the KSampler
    node) calls them: host.sample must give its latents, bit for bit, for the same seed and settings."""
    import nodes
    from perfusion_ops import host
    model, clip = tiny_model("sd1"), tiny_clip("sd1")
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a teddy"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, 8, 8)
    ours = host.sample(model, 7, 2, 5.0, "euler", "normal", positive, negative, latent)
    stock = nodes.common_ksampler(model, 7, 2, 5.0, "euler", "normal", positive, negative, {"samples": latent})[0]
    assert torch.equal(ours, stock["samples"])
    other_seed = host.sample(model, 8, 2, 5.0, "euler", "normal", positive, negative, latent)
    assert not torch.equal(ours, other_seed)
