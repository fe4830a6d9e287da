"""Issue 17: a patched model under the stock TorchCompileModel node (torch.compile of the diffusion model).

The node compiles with the backend it is given; the tests use dynamo's `eager` backend, which traces, guards and
recompiles exactly as `inductor` does but skips code generation (minutes on a CPU). Attention is PyTorch's SDPA,
ComfyUI's choice on GPUs (on the CPU it picks an attention that reads free memory, which dynamo cannot trace,
and the model falls apart into many graphs with or without the pack). What is checked: sampling through the
compiled, patched model gives the same latent as without compiling; a second sampling run reuses the graphs of
the first (no recompilation per step or per run); and the edit adds at most two graph breaks per call, where its
hooks are registered and removed."""
import pytest

from reference import random_concept
from support.tiny_models import sample, tiny_clip, tiny_model

pytestmark = pytest.mark.host


def compiled(model):
    """The model as the stock TorchCompileModel node returns it, compiled with dynamo's eager backend."""
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"].execute(model, "eager")[0]


def test_patched_model_compiles_once_and_samples_exactly_as_uncompiled(monkeypatch):
    import comfy.ldm.modules.attention as attention
    import torch._dynamo
    from torch._dynamo.utils import counters
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    model, clip = tiny_model("sd1", std=0.2), tiny_clip("sd1")
    context = clip.encode_from_tokens(clip.tokenize("a photo of a teddy"))
    concept = random_concept(model, "sd1", "sks", seed=1, context=context)
    patched, patched_clip = apply_concepts(model, [concept]), clip_with_concepts(clip, [concept])
    prompt = "a photo of embedding:sks on the beach"
    expected = [sample(patched, patched_clip, prompt, seed=seed, steps=3) for seed in (3, 4)]

    torch._dynamo.reset()
    counters.clear()
    fast = compiled(patched)
    first = sample(fast, patched_clip, prompt, seed=3, steps=3)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "nothing was compiled: the test shows nothing"
    breaks = dict(counters["graph_break"])
    assert sum(breaks.values()) <= 2, f"graph breaks beyond registering and removing the hooks: {breaks}"
    second = sample(fast, patched_clip, prompt, seed=4, steps=3)
    assert counters["stats"]["unique_graphs"] == graphs, "the second sampling run compiled new graphs"
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])
    # The edit is really inside the compiled run: without it the latent differs.
    assert not torch.equal(sample(compiled(model), patched_clip, prompt, seed=3, steps=3), first)
