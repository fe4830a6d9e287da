"""Issue 16: global key-locking (docs/method.md §1, global key-locking): every key projection reads the prompt with each concept's
word replaced by its superclass word; the values keep the concept's edit. Checked through ComfyUI's own sampler
(conditioning -> model conditions -> diffusion model) against an independent float64 reference."""
import logging

import pytest
import torch

from reference import ProjectionProbe, random_concept, reference_projection, reference_settings, weights_of
from support.tiny_models import sample, tiny_clip, tiny_model

pytestmark = pytest.mark.host

PROMPT = "a photo of a {} on the beach"


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def one_step(model, positive, seed=0, size=8):
    """One Euler step of ComfyUI's sampler at cfg 1 (so only the positive prompt runs: one row per call)."""
    import comfy.sample
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 1, 1.0, "euler", "normal", positive, positive, latent, seed=seed,
                               disable_pbar=True)


def probed(model):
    """A clone of `model` whose innermost DIFFUSION_MODEL wrapper records every to_k/to_v input and final output."""
    probe = ProjectionProbe()
    clone = model.clone()
    clone.add_wrapper_with_key("diffusion_model", "zz_probe", probe)
    return clone, probe


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def world(request):
    arch = request.param
    model, clip = tiny_model(arch, std=0.2), tiny_clip(arch)
    return arch, model, clip


def concept_on_its_token(model, clip, arch, name="sks", seed=1):
    """A random concept whose i* is the very context its word gets in PROMPT, so its gate opens there."""
    from perfusion_ops.text import clip_with_concepts
    draft = random_concept(model, arch, name, seed=seed)
    context = encode(clip_with_concepts(clip, [draft]), PROMPT.format(f"embedding:{name}"))[0][0]
    return random_concept(model, arch, name, seed=seed, context=context, position=5).replace(
        embeddings=draft.embeddings)


def check_global(probe, weights, concepts_settings, prompt_context, superclass_context):
    """to_k = W_k c_super for every token; to_v = the local edit of the concept prompt (float64 reference)."""
    assert probe.records, "the probe saw no cross-attention call"
    for (path, kind), (x, out) in probe.records.items():
        W = weights[(path, kind)].double()
        if kind == "to_k":
            assert torch.equal(x, superclass_context), f"{path}: the key projection did not read the key context"
            expected = superclass_context.double() @ W.T
        else:
            assert torch.equal(x, prompt_context)
            expected = reference_projection(W, x, reference_settings(concepts_settings, path, kind, W))
        err = (out.double() - expected).norm() / expected.norm()
        assert err < 1e-5, f"{path}.{kind}: relative error {err:.2e}"


def test_keys_come_from_the_superclass_prompt_and_values_keep_the_edit(world):
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    arch, model, clip = world
    concept = concept_on_its_token(model, clip, arch)
    positive = encode(clip_with_concepts(clip, [concept], "global"), PROMPT.format("embedding:sks"))
    prompt_context = positive[0][0]
    superclass_context = encode(clip, PROMPT.format("teddy"))[0][0]
    assert not torch.equal(prompt_context, superclass_context)

    patched, probe = probed(apply_concepts(model, [concept], 1.0, 0.5, 0.15, key_locking="global"))
    one_step(patched, positive)
    check_global(probe, weights_of(model), [(concept, 1.0, 0.5, 0.15)], prompt_context, superclass_context)

    # Local locking on the same conditioning differs at the keys (so the check above can tell them apart).
    local, local_probe = probed(apply_concepts(model, [concept], 1.0, 0.5, 0.15))
    one_step(local, positive)
    path = next(p for p, kind in local_probe.records if kind == "to_k")
    assert not torch.allclose(local_probe.records[(path, "to_k")][1], probe.records[(path, "to_k")][1], atol=1e-4)


def test_two_concepts_chained_or_combined_lock_both_words_and_compose_with_lora(world):
    import comfy.sd
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    from test_patch import lora_for
    arch, model, clip = world
    first = concept_on_its_token(model, clip, arch, "sks", seed=1)
    second = random_concept(model, arch, "zwx", seed=2).replace(superclass="cat")
    prompt = "a photo of embedding:sks and embedding:zwx in a garden"
    superclass_context = encode(clip, "a photo of teddy and cat in a garden")[0][0]
    lora, merged = lora_for(model)
    lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    weights = {**weights_of(model), **{key: W.float() for key, W in merged.items()}}
    settings = [(first, 1.0, 0.5, 0.15), (second, 0.8, 0.6, 0.2)]

    # Chained: the first node locally, the second globally (the last node decides); LoRA loaded before.
    chained_model = apply_concepts(apply_concepts(lora_model, [first], 1.0, 0.5, 0.15), [second], 0.8, 0.6, 0.2,
                                   key_locking="global")
    chained_clip = clip_with_concepts(clip_with_concepts(clip, [first]), [second], "global")
    positive = encode(chained_clip, prompt)
    patched, probe = probed(chained_model)
    one_step(patched, positive)
    check_global(probe, weights, settings, positive[0][0], superclass_context)

    # One node with both concepts (what Combine hands it), the LoRA loaded after the apply node.
    combined = apply_concepts(model, [first], 1.0, 0.5, 0.15, key_locking="global")
    combined = apply_concepts(combined, [second], 0.8, 0.6, 0.2, key_locking="global")
    combined, _ = comfy.sd.load_lora_for_models(combined, None, lora, 1.0, 0.0)
    positive = encode(clip_with_concepts(clip, [first, second], "global"), prompt)
    patched, probe = probed(combined)
    one_step(patched, positive)
    check_global(probe, weights, settings, positive[0][0], superclass_context)


def test_strength_zero_leaves_the_model_untouched_with_global_conditioning(world):
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    arch, model, clip = world
    concept = concept_on_its_token(model, clip, arch)
    global_clip = clip_with_concepts(clip, [concept], "global")
    for prompt in (PROMPT.format("embedding:sks"), "a photo of a teddy"):
        before = sample(model, global_clip, prompt, seed=3)
        zero = apply_concepts(model, [concept], strength=0.0, key_locking="global")
        assert torch.equal(sample(zero, global_clip, prompt, seed=3), before)
    assert torch.equal(sample(model, clip, "a photo of a teddy", seed=3),
                       sample(model, global_clip, "a photo of a teddy", seed=3))


def test_a_prompt_without_key_context_gets_local_locking_and_a_warning(world, caplog):
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    arch, model, clip = world
    concept = concept_on_its_token(model, clip, arch)
    local_clip = clip_with_concepts(clip, [concept])
    global_model = apply_concepts(model, [concept], 1.0, 0.5, 0.15, key_locking="global")
    local_model = apply_concepts(model, [concept], 1.0, 0.5, 0.15)
    with caplog.at_level(logging.WARNING):
        fallback = sample(global_model, local_clip, PROMPT.format("embedding:sks"), seed=4)
    assert torch.equal(fallback, sample(local_model, local_clip, PROMPT.format("embedding:sks"), seed=4))
    assert any("key_locking 'global'" in r.getMessage() for r in caplog.records)
    # With the global CLIP the sample differs from local locking.
    global_clip = clip_with_concepts(clip, [concept], "global")
    assert not torch.allclose(sample(global_model, global_clip, PROMPT.format("embedding:sks"), seed=4), fallback, atol=1e-4)


def test_global_locking_refuses_what_it_cannot_lock():
    from perfusion_ops.errors import PerfusionError
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    model, clip = tiny_model("sd1"), tiny_clip("sd1")
    concept = random_concept(model, "sd1", "sks")
    with pytest.raises(PerfusionError, match="key_locking"):
        apply_concepts(model, [concept], key_locking="everywhere")
    with pytest.raises(PerfusionError, match="one"):
        clip_with_concepts(clip, [concept.replace(superclass="teddy bear")], "global")
    two_vectors = concept.replace(embeddings={"clip_l": torch.randn(2, 768)})
    with pytest.raises(PerfusionError, match="2 word vectors"):
        clip_with_concepts(clip, [two_vectors], "global")
    assert clip_with_concepts(clip, [two_vectors], "local") is not None
