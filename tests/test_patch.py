"""Issue 3: the gated rank-1 K/V edit on real ComfyUI models: exactness, isolation, LoRA, windows, CLIP side."""
import pytest
import torch

from reference import (ProjectionProbe, adm_for, random_concept, reference_projection, reference_settings,
                       run_unet, weights_of)
from support.tiny_models import ARCHS, sample, tiny_clip, tiny_model

pytestmark = pytest.mark.host


def encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond, pooled


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
    arch = request.param
    model, clip = tiny_model(arch, std=0.2), tiny_clip(arch)
    context, pooled = encode(clip, "a photo of a teddy on the beach")
    return arch, model, clip, context, pooled


def check_against_reference(probe, concepts_settings, exact=True, weights=None, rel_tol=1e-5):
    """Every recorded to_k/to_v output equals the float64 reference of docs/method.md §1-2."""
    assert probe.records, "the probe saw no cross-attention call"
    for (path, kind), (x, out) in probe.records.items():
        W = weights[(path, kind)] if weights else None
        assert W is not None
        expected = reference_projection(W, x, reference_settings(concepts_settings, path, kind, W), exact=exact)
        err = (out.double() - expected).norm() / expected.norm()
        assert err < rel_tol, f"{path}.{kind}: relative error {err:.2e}"


@pytest.mark.parametrize("strength,beta,tau", [(1.0, 0.70, 0.15), (0.5, 0.3, 0.05), (2.0, 1.0, 0.5), (1.0, -0.5, 1.0)])
@pytest.mark.parametrize("with_keys", [False, True])
def test_every_cross_attention_projection_matches_float64_reference(setup, strength, beta, tau, with_keys):
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = setup
    concept = random_concept(model, arch, "sks", seed=1, with_keys=with_keys, context=context)
    patched = apply_concepts(model, [concept], strength, beta, tau)
    probe = ProjectionProbe()
    run_unet(patched, context, probe=probe, y=adm_for(model, clip, pooled))
    check_against_reference(probe, [(concept, strength, beta, tau)], weights=weights_of(model))
    # The gate really opens on the concept-like token and stays nearly shut elsewhere.
    x = probe.records[next(iter(probe.records))][0][0].float()
    r = (x @ concept.u) / (concept.u @ concept.i_star)
    assert r[4] > 0.9 and r[:4].abs().max() < 0.5


def test_strength_zero_is_bit_identical_and_inputs_stay_untouched(setup):
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    arch, model, clip, context, pooled = setup
    concept = random_concept(model, arch, "sks", seed=2, context=context)
    before = sample(model, clip, "a photo of a teddy", seed=3)
    other_branch = model.clone()
    before_other = sample(other_branch, clip, "a photo of a teddy", seed=3)

    zero = apply_concepts(model, [concept], strength=0.0)
    assert torch.equal(sample(zero, clip, "a photo of a teddy", seed=3), before)

    patched, patched_clip = apply_concepts(model, [concept]), clip_with_concepts(clip, [concept])
    edited = sample(patched, patched_clip, "a photo of a embedding:sks", seed=3)
    assert not torch.allclose(edited, before)
    assert torch.equal(sample(model, clip, "a photo of a teddy", seed=3), before)
    assert torch.equal(sample(other_branch, clip, "a photo of a teddy", seed=3), before_other)


def test_embedding_resolves_only_in_the_returned_clip(setup):
    from perfusion_ops.text import clip_with_concepts
    arch, model, clip, context, pooled = setup
    concept = random_concept(model, arch, "sks", seed=4)
    plain_before, _ = encode(clip, "a photo of embedding:sks on a table")
    patched = clip_with_concepts(clip, [concept])
    with_concept, _ = encode(patched, "a photo of embedding:sks on a table")
    plain_after, _ = encode(clip, "a photo of embedding:sks on a table")
    assert torch.equal(plain_before, plain_after)
    assert not torch.allclose(with_concept, plain_before)
    # The learned vector takes exactly one token slot: the rest of the prompt is unchanged up to it.
    assert torch.equal(with_concept[:, :4], plain_before[:, :4])
    # Weighted and comma forms work too.
    weighted, _ = encode(patched, "a photo of (embedding:sks:1.2), on a table")
    assert not torch.allclose(weighted, plain_before)


def test_sigma_window_switches_the_edit(setup):
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = setup
    concept = random_concept(model, arch, "sks", seed=5, context=context)
    sampling = model.get_model_object("model_sampling")
    start, end = 0.3, 0.6
    patched = apply_concepts(model, [concept], start_at=start, end_at=end)
    y = adm_for(model, clip, pooled)
    sigma_hi, sigma_lo = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
    for sigma, active in [(sigma_hi * 1.01, False), (sigma_hi * 0.99, True), ((sigma_hi + sigma_lo) / 2, True),
                          (sigma_lo * 1.01, True), (sigma_lo * 0.99, False)]:
        edited = run_unet(patched, context, sigma=sigma, y=y)
        plain = run_unet(model, context, sigma=sigma, y=y)
        assert torch.equal(edited, plain) != active, f"sigma {sigma}: expected active={active}"


def lora_for(model, rank=4, seed=0, alpha=2.0):
    """A LoRA (kohya key format) on every cross-attention to_k/to_v, and the merged weights it implies."""
    import comfy.lora
    from perfusion_ops.patch import cross_attention_layers
    g = torch.Generator().manual_seed(seed)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora, merged = {}, {}
    by_target = {v: k for k, v in key_map.items() if k.startswith("lora_unet_")}
    for path, attn in cross_attention_layers(model.model.diffusion_model).items():
        for kind in ("to_k", "to_v"):
            lin = getattr(attn, kind)
            name = by_target[f"diffusion_model.{path}.{kind}.weight"]
            up = torch.randn(lin.out_features, rank, generator=g) * 0.1
            down = torch.randn(rank, lin.in_features, generator=g) * 0.1
            lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"] = up, down
            lora[f"{name}.alpha"] = torch.tensor(alpha)
            merged[(path, kind)] = lin.weight.detach().double() + (alpha / rank) * (up.double() @ down.double())
    return lora, merged


@pytest.mark.parametrize("lowvram", [False, True])
def test_lora_on_the_same_weights_composes_exactly(setup, lowvram):
    import comfy.model_management
    import comfy.sd
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = setup
    lora, merged = lora_for(model)
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    concept = random_concept(model, arch, "sks", seed=6, context=context)
    patched = apply_concepts(with_lora, [concept], 1.0, 0.7, 0.15)
    comfy.model_management.unload_all_models()  # patch by hand below, as a loader would, from a clean state
    original = {name: weight.clone() for name, weight in model.model.diffusion_model.state_dict().items()}
    patched.patch_model(lowvram_model_memory=1 if lowvram else 0)
    try:
        if lowvram:
            from perfusion_ops.patch import cross_attention_layers
            lin = next(iter(cross_attention_layers(model.model.diffusion_model).values())).to_k
            assert lin.weight_function, "lowvram mode should apply the LoRA at cast time"
        probe = ProjectionProbe()
        run_unet(patched, context, probe=probe, y=adm_for(model, clip, pooled))
    finally:
        patched.unpatch_model()
    check_against_reference(probe, [(concept, 1.0, 0.7, 0.15)], weights=merged)
    # Restore is exact: every weight of the shared UNet is bit for bit what it was before patching.
    after = model.model.diffusion_model.state_dict()
    assert sorted(after) == sorted(original)
    changed = [name for name, weight in after.items() if not torch.equal(weight, original[name])]
    assert not changed, f"not restored exactly: {changed[:5]}"


def test_edit_still_applies_under_another_packs_attn2_replace(setup):
    """An attn2 replace patch (IPAdapter-style packs) gets, in every layer, exactly the edited keys and values."""
    import comfy.ldm.modules.attention as attention
    from perfusion_ops.patch import apply_concepts, cross_attention_layers
    arch, model, clip, context, pooled = setup
    seen = {}

    def replace(q, k, v, extra_options):  # what IPAdapter-style packs install
        seen[(tuple(extra_options["block"]), extra_options["block_index"])] = (k.clone(), v.clone())
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    def replace_key(path):  # the (block, index) a replace patch of this layer is registered and called under
        parts = path.split(".")
        block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
        return (block, int(parts[1]) if block != "middle" else 0), int(parts[-2])

    other = model.clone()
    layers = cross_attention_layers(model.model.diffusion_model)
    for path in layers:
        (block, number), index = replace_key(path)
        other.set_model_attn2_replace(replace, block, number, index)
    concept = random_concept(model, arch, "sks", seed=7, context=context)
    patched = apply_concepts(other, [concept])
    probe = ProjectionProbe()
    run_unet(patched, context, probe=probe, y=adm_for(model, clip, pooled))
    assert sorted(seen) == sorted(replace_key(path) for path in layers)
    check_against_reference(probe, [(concept, 1.0, 0.7, 0.15)], weights=weights_of(model))
    for path in layers:  # the replace patch attended with the edited projections of its own layer
        k, v = seen[replace_key(path)]
        assert torch.equal(k, probe.records[(path, "to_k")][1]), path
        assert torch.equal(v, probe.records[(path, "to_v")][1]), path


def test_concept_for_another_architecture_is_refused_by_name():
    from perfusion_ops.errors import PerfusionError
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    sd1, sdxl = tiny_model("sd1"), tiny_model("sdxl")
    concept = random_concept(sd1, "sd1", "sks")
    with pytest.raises(PerfusionError, match="trained for SD1.*this model is SDXL"):
        apply_concepts(sdxl, [concept])
    with pytest.raises(PerfusionError, match="trained for SD1.*CLIP belongs to SDXL"):
        clip_with_concepts(tiny_clip("sdxl"), [concept])


def test_concept_for_a_different_layer_layout_is_refused():
    from perfusion_ops.errors import PerfusionError
    from perfusion_ops.patch import apply_concepts
    model = tiny_model("sd1")
    concept = random_concept(model, "sd1", "sks")
    values = dict(concept.values)
    values.pop(sorted(values)[0])
    with pytest.raises(PerfusionError, match="does not match this model's cross-attention layers"):
        apply_concepts(model, [concept.replace(values=values)])
