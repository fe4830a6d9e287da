"""Several concepts on one model (docs/method.md §2): the joint patch, the Combine node and chained apply nodes.

- Every cross-attention to_k / to_v output agrees with an independent float64 reference of §2 for 2, 3 and 8
  concepts, exact and approximate, both for one set with shared settings and for chained per-concept settings.
- One concept in a set is exactly the single-concept edit; the order of concepts does not matter; chaining
  apply calls (or nodes) equals applying the combined set; each concept's token opens its own gate only.
- Clear errors for a concept used twice and for concepts of different architectures; a warning for concepts
  estimated with different covariances, and for a concept whose gate opens on another concept's word.
"""
import importlib
import logging
import math

import pytest
import torch

from reference import (ProjectionProbe, adm_for, random_concept, reference_projection, reference_settings,
                       run_unet, weights_of)
from support.tiny_models import register_test_nodes, tiny_clip, tiny_model

pytestmark = pytest.mark.host

PROMPT = "a photo of a teddy on the beach"
POSITIONS = (1, 2, 3, 4, 5, 6, 7, 8)  # the word tokens of PROMPT: concept a's i* is the context token POSITIONS[a]
# Per-concept (strength, beta, tau) for chained apply calls; all different, all inside the node's input ranges.
SETTINGS = [(1.0, 0.70, 0.15), (0.5, 0.60, 0.10), (1.5, 0.80, 0.25), (1.0, 0.50, 0.05),
            (0.8, 0.75, 0.15), (2.0, 0.90, 0.30), (1.2, 0.65, 0.20), (0.3, 0.70, 0.10)]
SHARED = (1.0, 0.70, 0.15)
# Ridge of the covariance used for the reference tests, as a fraction of its mean eigenvalue. The default of
# random_concept (0.01) whitens the prompt's tokens so well that the Gram matrix is nearly diagonal (off-diagonal
# entries below 0.03 of the diagonal: exact and approximate modes barely differ). With 1.0, off-diagonal entries
# reach 0.67 of the diagonal and the Gram matrix of 8 concepts has a condition number ~10 (sd1; SDXL: 0.46, ~4).
COUPLED_RIDGE = 1.0


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tiny models gain nothing from a second thread, and on a 2-core machine shared with other jobs
    OpenMP's spinning threads made this file ~10x slower (2 min instead of 15 s). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encode(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


_models: dict = {}


def models(arch):
    """(arch, model, clip, context of PROMPT, pooled), built once per test session: building the tiny CLIP's
    token embedding is the slowest part. The same model and CLIP as PerfusionTestTinyCheckpoint(arch, 0, 0.2)."""
    if arch not in _models:
        model, clip = tiny_model(arch, 0, std=0.2), tiny_clip(arch, 0, embedding_directory=[])
        _models[arch] = (arch, model, clip, *encode(clip, PROMPT))
    return _models[arch]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def setup(request):
    return models(request.param)


@pytest.fixture(scope="module")
def sd1():
    return models("sd1")


def covariance_inverse_times(context, vectors, ridge):
    """C⁻¹ v for C = the context's uncentered second moment + ridge · (trace C / d) · I, in float64."""
    X = context[0].double()
    d = X.shape[1]
    C = X.T @ X / X.shape[0]
    C = C + ridge * C.trace() / d * torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(C, vectors.double().T).T


_coupled_cache: dict = {}


def coupled_concepts(model, arch, context, k, ridge=COUPLED_RIDGE):
    """k concepts on distinct tokens of `context`, with u from covariances that leave their directions coupled.
    Each concept has its own ridge (ridge x 0.3, 1 or 3), as concepts estimated on different covariances would:
    then G_ab = i*_aᵀ C_a⁻¹ i*_b is not symmetric, so the tests also see a transposed G⁻¹ (with one shared C,
    G is symmetric and a transposition bug passes unnoticed). Every second concept carries trained key targets,
    the others are key-locked. The first k of one list of 8, built once per model and ridge (the float64 solves
    are the slow part for SDXL's 2048-wide context)."""
    key = (id(model), arch, ridge)
    if key not in _coupled_cache:
        concepts = [random_concept(model, arch, f"c{a}", seed=10 + a, with_keys=a % 2 == 1, context=context,
                                   position=POSITIONS[a]) for a in range(len(POSITIONS))]
        i_star = torch.stack([c.i_star for c in concepts])
        factors = [(0.3, 1.0, 3.0)[a % 3] for a in range(len(concepts))]
        u = {f: covariance_inverse_times(context, i_star, ridge * f).float() for f in set(factors)}
        _coupled_cache[key] = (model, [c.replace(u=u[f][a].clone())
                                       for a, (c, f) in enumerate(zip(concepts, factors))])
    return _coupled_cache[key][1][:k]


def separated_concepts(model, arch, context, k):
    """k concepts on distinct tokens, with random_concept's own (well-whitening) covariance."""
    return [random_concept(model, arch, f"s{a}", seed=20 + a, context=context, position=POSITIONS[a])
            for a in range(k)]


def reference_errors(probe, concepts_settings, weights, exact):
    """Relative error of every recorded to_k/to_v output against the float64 reference, by (path, kind)."""
    assert probe.records, "the probe saw no cross-attention call"
    errors = {}
    for (path, kind), (x, out) in probe.records.items():
        W = weights[(path, kind)]
        expected = reference_projection(W, x, reference_settings(concepts_settings, path, kind, W), exact=exact)
        errors[(path, kind)] = float((out.double() - expected).norm() / expected.norm())
    return errors


def probe_run(model, setup_, sigma=1.0):
    arch, _, clip, context, pooled = setup_
    probe = ProjectionProbe()
    out = run_unet(model, context, sigma=sigma, probe=probe, y=adm_for(model, clip, pooled))
    return out, probe


def chain(model, concepts, settings, exact=True):
    """One apply call per concept, each with its own settings (what chained apply nodes do)."""
    from perfusion_ops.patch import apply_concepts
    for concept, (strength, beta, tau) in zip(concepts, settings):
        model = apply_concepts(model, [concept], strength, beta, tau, exact=exact)
    return model


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------- agreement with the float64 reference

@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approximate"])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_several_concepts_match_float64_reference(setup, k, exact):
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = setup
    concepts = coupled_concepts(model, arch, context, k)
    weights = weights_of(model)

    # One set, shared settings (what the Combine node feeds to one apply node).
    _, probe = probe_run(apply_concepts(model, concepts, *SHARED, exact=exact), setup)
    errors = reference_errors(probe, [(c, *SHARED) for c in concepts], weights, exact)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{k} concepts, one set: {worst}: relative error {errors[worst]:.2e}"

    # Chained apply calls, per-concept settings: one joint patch, same reference.
    _, probe = probe_run(chain(model, concepts, SETTINGS[:k], exact), setup)
    joint = [(c, *s) for c, s in zip(concepts, SETTINGS[:k])]
    errors = reference_errors(probe, joint, weights, exact)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{k} concepts, chained: {worst}: relative error {errors[worst]:.2e}"

    # The test can tell the two modes apart: with these coupled concepts they differ far beyond the tolerance.
    (path, kind), (x, out) = next((key, rec) for key, rec in probe.records.items() if key[1] == "to_v")
    refs = reference_settings(joint, path, kind, weights[(path, kind)])
    other_mode = reference_projection(weights[(path, kind)], x, refs, exact=not exact)
    assert rel(out, other_mode) > 1e-3


def test_exact_mode_stays_accurate_for_an_ill_conditioned_gram_matrix(sd1):
    """8 strongly coupled concepts (Gram condition number ~73): still within 1e-5 of the reference (measured ~4e-7)."""
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = sd1
    concepts = coupled_concepts(model, arch, context, 8, ridge=10.0)
    U, I = torch.stack([c.u for c in concepts]).double(), torch.stack([c.i_star for c in concepts]).double()
    assert torch.linalg.cond(U @ I.T) > 20
    _, probe = probe_run(apply_concepts(model, concepts, *SHARED, exact=True), sd1)
    errors = reference_errors(probe, [(c, *SHARED) for c in concepts], weights_of(model), exact=True)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.2e}"


def test_concepts_with_the_same_direction_are_refused_by_name_in_exact_mode_and_work_approximately(sd1):
    """Two concepts with one i* make G singular: exact mode refuses them, naming both; approximate mode, which
    needs no G, applies them and stays finite."""
    from perfusion_ops.errors import PerfusionError
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = sd1
    a = coupled_concepts(model, arch, context, 1)[0]
    twin = a.replace(name="twin")  # e.g. a copy of a concept file saved under another name
    with pytest.raises(PerfusionError, match="linearly dependent") as refused:
        apply_concepts(model, [a, twin], exact=True)
    assert "twin" in str(refused.value) and a.name in str(refused.value) and "approximate" in str(refused.value)
    assert torch.isfinite(probe_run(apply_concepts(model, [a, twin], exact=False), sd1)[0]).all()


def test_linearly_dependent_concepts_are_refused_by_name_in_exact_mode_and_work_approximately(sd1):
    """A third concept whose i* lies in the span of two others (yet is like neither) makes G singular: exact mode
    refuses the set naming it; approximate mode applies it without any projection blowing up."""
    from perfusion_ops.errors import PerfusionError
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = sd1
    a, b = random_concept(model, arch, "a", seed=40, context=context, position=1), \
        random_concept(model, arch, "b", seed=41, context=context, position=2)
    i_mix = (a.i_star + b.i_star) / 2
    mix = random_concept(model, arch, "mix", seed=42, context=context).replace(
        i_star=i_mix, u=covariance_inverse_times(context, i_mix[None], 0.01)[0].float())
    with pytest.raises(PerfusionError, match="linearly dependent") as refused:
        apply_concepts(model, [a, b, mix], exact=True)
    assert "mix" in str(refused.value)
    patched = apply_concepts(model, [a, b, mix], exact=False)
    _, plain = probe_run(model, sd1)
    _, edited = probe_run(patched, sd1)
    growth = max(float(edited.records[k][1].norm() / plain.records[k][1].norm()) for k in plain.records)
    assert growth < 10, f"an edited projection is {growth:.3g} times its unpatched size"


# ---------------------------------------------------------------- invariances

@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approximate"])
def test_one_concept_in_a_set_is_exactly_the_single_concept_edit(sd1, exact):
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = sd1
    a, b = coupled_concepts(model, arch, context, 2)
    single = apply_concepts(model, [a], *SETTINGS[1], exact=True)
    expected, _ = probe_run(single, sd1)

    # k = 1 in either mode takes the §1 path: bit-identical.
    assert torch.equal(probe_run(apply_concepts(model, [a], *SETTINGS[1], exact=exact), sd1)[0], expected)
    # A second concept at strength 0 is not there at all (s = 0 leaves the model as it was).
    with_zero = apply_concepts(single, [b], 0.0, 0.7, 0.15, exact=exact)
    assert torch.equal(probe_run(with_zero, sd1)[0], expected)
    # Nor is one outside its sampling window (active only for the last half of the schedule; sigma here is high).
    late = apply_concepts(single, [b], 1.0, 0.7, 0.15, start_at=0.5, end_at=1.0, exact=exact)
    sigma = float(model.get_model_object("model_sampling").percent_to_sigma(0.1))
    assert torch.equal(probe_run(late, sd1, sigma=sigma)[0], probe_run(single, sd1, sigma=sigma)[0])
    # ... but inside its window it is.
    assert not torch.equal(probe_run(late, sd1, sigma=0.5)[0], probe_run(single, sd1, sigma=0.5)[0])


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approximate"])
def test_order_of_concepts_does_not_matter(sd1, exact):
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = sd1
    concepts = coupled_concepts(model, arch, context, 8)
    # Every edited projection (the patch's own output) agrees within 1e-6: measured <= ~1e-7, float32 summation
    # order. The UNet output is compared at 1e-5: this random std-0.2 UNet amplifies rounding-level changes of
    # its cross-attention 10-20 fold (a relative 1e-7 change of the context moved its output by ~5e-7), and
    # reordered sets measured up to 1.3e-6 there (their projections: <= 7e-8).
    out, probe = probe_run(apply_concepts(model, concepts, *SHARED, exact=exact), sd1)
    generator = torch.Generator().manual_seed(0)
    for order in [list(reversed(range(8)))] + [torch.randperm(8, generator=generator).tolist() for _ in range(2)]:
        permuted = [concepts[i] for i in order]
        out_p, probe_p = probe_run(apply_concepts(model, permuted, *SHARED, exact=exact), sd1)
        for key, (x, h) in probe.records.items():
            assert rel(probe_p.records[key][1], h) < 1e-6, f"order {order}, {key}"
        assert rel(out_p, out) < 1e-5, f"order {order}: UNet output differs by {rel(out_p, out):.2e}"
    # With per-concept settings (chained), the settings travel with their concepts.
    chained, probe = probe_run(chain(model, concepts[:3], SETTINGS[:3], exact), sd1)
    reordered, probe_r = probe_run(chain(model, concepts[:3][::-1], SETTINGS[:3][::-1], exact), sd1)
    for key, (x, h) in probe.records.items():
        assert rel(probe_r.records[key][1], h) < 1e-6, f"chained, reordered: {key}"
    assert rel(reordered, chained) < 1e-5


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approximate"])
def test_chained_apply_equals_the_combined_set(sd1, exact):
    from perfusion_ops.patch import DIFFUSION_MODEL_WRAPPER, WRAPPER_KEY, applied_concepts, apply_concepts
    arch, model, clip, context, pooled = sd1
    concepts = coupled_concepts(model, arch, context, 3)
    joint = apply_concepts(model, concepts, *SHARED, exact=exact)
    chained = chain(model, concepts, [SHARED] * 3, exact)
    # One joint patch, not stacked ones.
    assert len(chained.get_wrappers(DIFFUSION_MODEL_WRAPPER, WRAPPER_KEY)) == 1
    assert [a.concept.name for a in applied_concepts(chained)] == [c.name for c in concepts]
    assert torch.equal(probe_run(chained, sd1)[0], probe_run(joint, sd1)[0])
    # A then (B, C) as a set is the same again.
    split = apply_concepts(apply_concepts(model, concepts[:1], *SHARED, exact=exact), concepts[1:], *SHARED,
                           exact=exact)
    assert torch.equal(probe_run(split, sd1)[0], probe_run(joint, sd1)[0])
    # Every intermediate model is untouched by what is chained after it.
    first = apply_concepts(model, concepts[:1], *SHARED, exact=exact)
    before = probe_run(first, sd1)[0]
    apply_concepts(first, concepts[1:], *SHARED, exact=exact)
    assert torch.equal(probe_run(first, sd1)[0], before)
    assert len(applied_concepts(first)) == 1


def test_each_concepts_token_opens_its_own_gate_only(sd1):
    from perfusion_ops import rank1
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = sd1
    k = 4
    concepts = separated_concepts(model, arch, context, k)
    strength, beta, tau = SHARED
    _, probe = probe_run(apply_concepts(model, concepts, strength, beta, tau, exact=True), sd1)
    U = torch.stack([c.u for c in concepts])
    E = (U * torch.stack([c.i_star for c in concepts])).sum(-1)
    for (path, kind), (x, out) in probe.records.items():
        x = x[0].float()
        r = (x @ U.T) / E                                     # r[token, concept]
        g = rank1.gate(r, torch.tensor(beta), torch.tensor(tau))
        for a, p in enumerate(POSITIONS[:k]):
            others = [q for b, q in enumerate(POSITIONS[:k]) if b != a]
            assert abs(r[p, a] - 1) < 1e-4, f"{path}: concept {a} on its own token: r = {r[p, a]:.4f}"
            assert r[others, a].abs().max() < 0.1, f"{path}: concept {a} on others' tokens: r = {r[others, a]}"
            assert g[p, a] > 0.85 and g[others, a].max() < 0.05, f"{path}: gate of concept {a}: {g[:, a]}"
    # What the edit does with it: leaving concept b out of the set changes the value on concept a's token only
    # by b's nearly shut gate (exact mode removes every W i*_a there either way), unless b is a itself.
    for b in range(k):
        _, probe_b = probe_run(apply_concepts(model, concepts[:b] + concepts[b + 1:], strength, beta, tau), sd1)
        for (path, kind), (x, out) in probe.records.items():
            if kind != "to_v":
                continue
            without_b = probe_b.records[(path, kind)][1]
            for a, p in enumerate(POSITIONS[:k]):
                change = rel(without_b[0, p], out[0, p])
                if a == b:
                    assert change > 0.5, f"{path}: leaving out concept {a} changes its own token by {change:.3f}"
                else:
                    assert change < 0.05, f"{path}: leaving out concept {b} changes the token of {a} by {change:.3f}"


# ---------------------------------------------------------------- errors and warnings

def test_the_same_concept_twice_is_refused(sd1):
    from perfusion_ops.errors import PerfusionError
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = sd1
    a, b = separated_concepts(model, arch, context, 2)
    with pytest.raises(PerfusionError, match=r"\['s0'\] applied twice"):
        apply_concepts(model, [a, b, a])
    with pytest.raises(PerfusionError, match=r"\['s1'\] applied twice"):
        apply_concepts(apply_concepts(model, [a, b]), [b])


def test_different_covariances_warn(sd1, pack, caplog):
    from perfusion_ops.patch import apply_concepts
    combine = importlib.import_module(pack.__name__ + ".nodes.combine").combine
    from perfusion_ops.concept import ConceptSet
    arch, model, clip, context, pooled = sd1
    a, b = separated_concepts(model, arch, context, 2)
    same = [a.replace(covariance="cov-1"), b.replace(covariance="cov-1")]
    mixed = [a.replace(covariance="cov-1"), b.replace(covariance="cov-2")]

    with caplog.at_level(logging.WARNING):
        combine([ConceptSet((same[0],)), ConceptSet((same[1],))])
        apply_concepts(apply_concepts(model, same[:1]), same[1:])
    assert not [r for r in caplog.records if "covariance" in r.getMessage()]

    with caplog.at_level(logging.WARNING):
        combine([ConceptSet((mixed[0],)), ConceptSet((mixed[1],))])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "different covariances" in r.getMessage()]
    assert len(warnings) == 1 and "cov-1" in warnings[0].getMessage() and "cov-2" in warnings[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        apply_concepts(apply_concepts(model, mixed[:1]), mixed[1:])  # chained apply nodes: warned too
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "different covariances" in r.getMessage()]
    assert len(warnings) == 1 and "cov-2" in warnings[0].getMessage()


# ---------------------------------------------------------------- through ComfyUI's executor

CAPTURED: dict = {}


class CaptureLatent:
    """Test-only output node: keeps its LATENT input in CAPTURED[key]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def capture(self, samples, key):
        CAPTURED[key] = samples["samples"].clone()
        return {}


@pytest.fixture
def graph_nodes(perfusion_dir):
    import nodes
    register_test_nodes()
    nodes.NODE_CLASS_MAPPINGS["PerfusionTestCaptureLatent"] = CaptureLatent
    CAPTURED.clear()
    yield perfusion_dir
    nodes.NODE_CLASS_MAPPINGS.pop("PerfusionTestCaptureLatent", None)
    CAPTURED.clear()


NODE_PROMPT = "a photo of embedding:a and embedding:b"


def concepts_on_prompt_tokens(concept_dir):
    """Concepts a and b (sd1), written to models/perfusion, whose i* are the very context tokens that
    embedding:a and embedding:b become in NODE_PROMPT: in the graph both gates really open."""
    from perfusion_ops.concept_file import write_concept
    from perfusion_ops.text import clip_with_concepts
    _, model, clip, _, _ = models("sd1")  # what PerfusionTestTinyCheckpoint(sd1, seed 0, weight_std 0.2) builds
    drafts = [random_concept(model, "sd1", name, seed=30 + i) for i, name in enumerate("ab")]
    tokens = clip_with_concepts(clip, drafts).tokenize(NODE_PROMPT)["l"][0]
    positions = [i for i, (t, w) in enumerate(tokens) if not isinstance(t, int)]
    assert len(positions) == 2
    context, _ = encode(clip_with_concepts(clip, drafts), NODE_PROMPT)
    i_star = context[0, positions].float()
    u = covariance_inverse_times(context, i_star, 0.01).float()
    concepts = [c.replace(i_star=i_star[n].clone(), u=u[n].clone()) for n, c in enumerate(drafts)]
    for c in concepts:
        write_concept(c, concept_dir / f"{c.name}.safetensors")
    return concepts


def sampling_nodes(prefix, model, clip, text, key):
    """CLIPTextEncode + KSampler + capture, reading model/clip from the given links."""
    return {
        f"{prefix}p": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}},
        f"{prefix}k": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"{prefix}p", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        f"{prefix}c": {"class_type": "PerfusionTestCaptureLatent",
                       "inputs": {"samples": [f"{prefix}k", 0], "key": key}},
    }


def apply_node(model, clip, concept, mode, strength=1.0, beta=0.7, tau=0.15, key_locking="local"):
    return {"class_type": "PerfusionApplyConcept", "inputs": {
        "model": model, "clip": clip, "concept": concept, "strength": strength, "beta": beta, "tau": tau,
        "start_at": 0.0, "end_at": 1.0, "multi_concept_mode": mode, "key_locking": key_locking}}


def base_graph(files):
    graph = {
        "ckpt": {"class_type": "PerfusionTestTinyCheckpoint", "inputs": {"arch": "sd1", "seed": 0, "weight_std": 0.2}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    for name, file in files.items():
        graph[f"load_{name}"] = {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": file}}
    return graph


def test_nodes_chained_apply_equals_combine_and_the_concepts_take_effect(graph_nodes):
    from support.comfy_runner import run_prompt
    concepts_on_prompt_tokens(graph_nodes)
    graph = base_graph({"a": "a.safetensors", "b": "b.safetensors"})
    graph["combine"] = {"class_type": "PerfusionCombineConcepts",
                        "inputs": {"concept_1": ["load_a", 0], "concept_2": ["load_b", 0]}}
    for mode in ("exact", "approximate"):
        # Chained: apply a, then apply b to the result (the first node's mode does not matter: the last decides).
        graph[f"{mode}_chain_a"] = apply_node(["ckpt", 0], ["ckpt", 1], ["load_a", 0], "exact")
        graph[f"{mode}_chain_b"] = apply_node([f"{mode}_chain_a", 0], [f"{mode}_chain_a", 1], ["load_b", 0], mode)
        graph.update(sampling_nodes(f"{mode}_chain_", [f"{mode}_chain_b", 0], [f"{mode}_chain_b", 1],
                                    NODE_PROMPT, f"chained_{mode}"))
        # Combined: one apply node with the set.
        graph[f"{mode}_set"] = apply_node(["ckpt", 0], ["ckpt", 1], ["combine", 0], mode)
        graph.update(sampling_nodes(f"{mode}_set_", [f"{mode}_set", 0], [f"{mode}_set", 1], NODE_PROMPT,
                                    f"combined_{mode}"))
    # The unpatched model with the plain CLIP, and the unpatched model with the concepts' words only.
    graph.update(sampling_nodes("base_", ["ckpt", 0], ["ckpt", 1], NODE_PROMPT, "base"))
    graph["words_only"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["exact_set", 1], "text": NODE_PROMPT}}
    graph["words_only_k"] = {**graph["base_k"], "inputs": {**graph["base_k"]["inputs"], "positive": ["words_only", 0]}}
    graph["words_only_c"] = {"class_type": "PerfusionTestCaptureLatent",
                             "inputs": {"samples": ["words_only_k", 0], "key": "words_only"}}
    # Per-concept settings: chained with b at another strength/beta/tau differs from the shared-settings chain.
    graph["tuned_b"] = apply_node(["exact_chain_a", 0], ["exact_chain_a", 1], ["load_b", 0], "exact", 0.5, 0.6, 0.1)
    graph.update(sampling_nodes("tuned_", ["tuned_b", 0], ["tuned_b", 1], NODE_PROMPT, "tuned"))

    run_prompt(graph)
    latents = CAPTURED
    assert set(latents) == {"chained_exact", "combined_exact", "chained_approximate", "combined_approximate",
                            "base", "words_only", "tuned"}
    for mode in ("exact", "approximate"):
        assert torch.equal(latents[f"chained_{mode}"], latents[f"combined_{mode}"]), mode  # measured: bit-identical
    # The concepts change the image: against the base graph, and against their words on the unpatched model.
    assert rel(latents["combined_exact"], latents["base"]) > 1e-2
    assert rel(latents["combined_exact"], latents["words_only"]) > 1e-2
    assert not torch.equal(latents["tuned"], latents["chained_exact"])
    assert all(torch.isfinite(t).all() for t in latents.values())


def test_nodes_global_key_locking_chained_equals_combined_and_differs_from_local(graph_nodes):
    """key_locking 'global' through the executor: the last apply node of a chain decides for both concepts, and
    the chain (a local, then b global) samples what one apply node with the combined set samples."""
    from support.comfy_runner import run_prompt
    concepts_on_prompt_tokens(graph_nodes)
    graph = base_graph({"a": "a.safetensors", "b": "b.safetensors"})
    graph["combine"] = {"class_type": "PerfusionCombineConcepts",
                        "inputs": {"concept_1": ["load_a", 0], "concept_2": ["load_b", 0]}}
    graph["chain_a"] = apply_node(["ckpt", 0], ["ckpt", 1], ["load_a", 0], "exact", beta=0.5)
    graph["chain_b"] = apply_node(["chain_a", 0], ["chain_a", 1], ["load_b", 0], "exact", beta=0.5, key_locking="global")
    graph.update(sampling_nodes("chain_", ["chain_b", 0], ["chain_b", 1], NODE_PROMPT, "chained_global"))
    for locking in ("local", "global"):
        graph[f"set_{locking}"] = apply_node(["ckpt", 0], ["ckpt", 1], ["combine", 0], "exact", beta=0.5,
                                             key_locking=locking)
        graph.update(sampling_nodes(f"set_{locking}_", [f"set_{locking}", 0], [f"set_{locking}", 1], NODE_PROMPT,
                                    f"combined_{locking}"))
    run_prompt(graph)
    assert torch.equal(CAPTURED["chained_global"], CAPTURED["combined_global"])
    assert rel(CAPTURED["combined_global"], CAPTURED["combined_local"]) > 1e-3


def test_nodes_refuse_a_concept_twice_and_mixed_architectures(graph_nodes):
    from support.comfy_runner import run_prompt, run_prompt_expecting_error
    from perfusion_ops.concept_file import write_concept
    sd1_model, sdxl_model = models("sd1")[1], tiny_model("sdxl")
    write_concept(random_concept(sd1_model, "sd1", "a", seed=1, context=torch.randn(1, 4, 768), position=0),
                  graph_nodes / "a.safetensors")
    write_concept(random_concept(sd1_model, "sd1", "b", seed=2, context=torch.randn(1, 4, 768), position=0),
                  graph_nodes / "b.safetensors")
    write_concept(random_concept(sdxl_model, "sdxl", "x", seed=3, context=torch.randn(1, 4, 2048), position=0),
                  graph_nodes / "x.safetensors")

    def graph_combining(first, second):
        graph = {name: {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": f"{name}.safetensors"}}
                 for name in ("a", "b", "x")}
        graph["combine"] = {"class_type": "PerfusionCombineConcepts",
                            "inputs": {"concept_1": [first, 0], "concept_2": [second, 0]}}
        graph["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["combine", 0]}}
        return graph

    run_prompt(graph_combining("a", "b"))  # the same graph with two different sd1 concepts runs
    message = run_prompt_expecting_error(graph_combining("a", "a"))
    assert "['a'] appear more than once" in message, message
    message = run_prompt_expecting_error(graph_combining("a", "x"))
    assert "different architectures" in message and "a (sd1)" in message and "x (sdxl)" in message, message

    # Chained apply nodes with the same concept are refused by the second node.
    graph = base_graph({"a": "a.safetensors"})
    graph["first"] = apply_node(["ckpt", 0], ["ckpt", 1], ["load_a", 0], "exact")
    graph["second"] = apply_node(["first", 0], ["first", 1], ["load_a", 0], "exact")
    graph.update(sampling_nodes("s_", ["second", 0], ["second", 1], "a photo of embedding:a", "s"))
    message = run_prompt_expecting_error(graph)
    assert "['a'] applied twice" in message, message
    assert not CAPTURED


def test_a_gate_that_opens_on_another_concepts_word_warns_once_per_pair(sd1, caplog):
    """Concept b's i* leans towards a's (i*_b = 0.9 i*_a + 0.9 i*_c, c separated from a): a's gate input at b's
    word, r_ab = i*_aᵀC⁻¹i*_b / i*_aᵀC⁻¹i*_a, computed here in float64 from C, is about 0.9, and b's at a's
    word about 0.55. At beta 0.7 only a warns, naming b and r_ab; at beta 0.95 nothing does; separated concepts
    never do; a chain that adds a separated concept afterwards does not repeat the pair."""
    from perfusion_ops.patch import apply_concepts
    arch, model, clip, context, pooled = sd1
    a, c, d = separated_concepts(model, arch, context, 3)
    i_b = 0.9 * a.i_star + 0.9 * c.i_star
    b = random_concept(model, arch, "b", seed=43, context=context).replace(
        i_star=i_b, u=covariance_inverse_times(context, i_b[None], 0.01)[0].float())
    c_inv_i = covariance_inverse_times(context, torch.stack([a.i_star, i_b]), 0.01)
    r_ab = float(c_inv_i[0] @ i_b.double() / (c_inv_i[0] @ a.i_star.double()))
    r_ba = float(c_inv_i[1] @ a.i_star.double() / (c_inv_i[1] @ i_b.double()))
    assert 0.8 < r_ab < 1.0 and 0.45 < r_ba < 0.65, (r_ab, r_ba)

    def crossed(run):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run()
        return [r.getMessage() for r in caplog.records if "opens its gate" in r.getMessage()]

    assert crossed(lambda: apply_concepts(model, [a, c, d], beta=0.7)) == []
    assert crossed(lambda: apply_concepts(model, [a, b], beta=0.95)) == []
    warned = crossed(lambda: apply_concepts(apply_concepts(model, [a, b], beta=0.7), [d], beta=0.7))
    assert len(warned) == 1, warned
    assert f"concept '{a.name}' opens its gate on the word of 'b'" in warned[0]
    assert f"gate input {r_ab:.2f}" in warned[0] and "beta 0.70" in warned[0]
    assert "No beta separates them" in warned[0]  # r_ab + 2 tau > 1: a beta that shuts it there shuts it everywhere
    # chained: b applied after a with its own beta, below r_ba: b now warns about a as well, and a beta of
    # r_ba + 2 tau would shut b's gate on a's word while leaving it open on its own
    warned = crossed(lambda: apply_concepts(apply_concepts(model, [a], beta=0.7), [b], beta=0.5))
    assert sorted(m.split("'")[1] for m in warned) == sorted([a.name, "b"]), warned
    about_b = next(m for m in warned if m.startswith("Perfusion: concept 'b'"))
    shut = r_ba + 2 * 0.15
    own_gate = 1 / (1 + math.exp(-(1 - shut) / 0.15))
    assert f"gate input {r_ba:.2f}" in about_b and "beta 0.50" in about_b, about_b
    assert f"own apply node with beta {shut:.2f} (its gate then 0.12 there and {own_gate:.2f} on its own word)" in about_b
