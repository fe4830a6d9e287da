"""Training on models loaded as users' GPUs load them: float16 and bfloat16 (on the CPU, tiny models).

The concept's tensors, optimizer and loss are float32 whatever the model's dtype; float16 gets dynamic loss
scaling (perfusion_ops/precision.py). Checked here: the first gradient in each dtype against float32, with a
control that float16 without scaling loses it, and whole trainings through ComfyUI's executor.
"""
from __future__ import annotations

import pytest
import torch

from test_train import PhotoBatch, load_photos, train_graph
from support.tiny_models import register_test_nodes, tiny_clip, tiny_model, tiny_vae

pytestmark = pytest.mark.host


def _first_gradient(dtype: torch.dtype, loss_scaling: bool, latents, masks) -> torch.Tensor:
    """The float32 gradient (word vector and value targets) of the first micro-batch of a training run on the
    tiny SD1 model loaded in `dtype`, from the same weights (rounded to `dtype`) and the same draws."""
    import comfy.model_management as mm
    from perfusion_ops import host, train
    model, clip = tiny_model("sd1", std=0.2, dtype=dtype), tiny_clip("sd1", dtype=dtype)
    settings = train.TrainSettings(seed=3, batch_size=2, gradient_accumulation=1, loss_scaling=loss_scaling)
    train_model, train_clip = train.trainable_clones(model, clip)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            mm.load_models_gpu([train_model, train_clip.patcher])
            photos = train._Photos(train_model.model, latents, masks, None, None)
            run = train._Training(train_model, train_clip, photos, "hugsy", "teddy", "sd1",
                                  train.superclass_tokens(clip, "teddy"), torch.eye(768, dtype=torch.float64), "eye",
                                  settings)
            assert run.loss_scale.enabled == (dtype == torch.float16 and loss_scaling)
            _, grads, _ = run._micro_batch()
    finally:
        host.unload(train_model, train_clip.patcher)
    assert all(g.dtype == torch.float32 for g in grads)
    return torch.cat([g.flatten() for g in grads])


def test_the_first_gradient_in_float16_and_bfloat16_is_float32s_and_float16_without_scaling_loses_it():
    """256² photos (32² latents), batch 2: the per-element gradient of the masked ε-MSE, ~2·(ε̂−ε)/8192, is near
    float16's smallest normal number (6.1e-5), and smaller still deeper in the backward pass.

    Required cosines to the float32 gradient: float16 with loss scaling >= 0.999 (its 11-bit mantissa rounds each
    activation by <= 0.05%; measured 0.9998); bfloat16 >= 0.95 (8-bit mantissa, <= 0.4% per activation, compounding
    over ~20 layers; measured 0.988). The control, float16 without scaling, must fall below 0.9 (measured 0.72):
    that is the gradient users of unscaled float16 training silently lose."""
    images, masks = load_photos("teddy", 256)
    latents = tiny_vae().encode(images)
    reference = _first_gradient(torch.float32, True, latents, masks)
    cosine = lambda g: float(torch.nn.functional.cosine_similarity(g, reference, dim=0))  # noqa: E731
    half = _first_gradient(torch.float16, True, latents, masks)
    brain = _first_gradient(torch.bfloat16, True, latents, masks)
    unscaled = _first_gradient(torch.float16, False, latents, masks)
    assert cosine(half) >= 0.999 and 0.98 < float(half.norm() / reference.norm()) < 1.02, cosine(half)
    assert cosine(brain) >= 0.95, cosine(brain)
    assert cosine(unscaled) < 0.9, f"float16 without loss scaling kept its gradient (cosine {cosine(unscaled):.4f})"


def _learned(concept, start) -> torch.Tensor:
    """What training changed: word vector and value targets, minus where they started."""
    return torch.cat([concept.embeddings["clip_l"].flatten() - start.embeddings["clip_l"].flatten()]
                     + [concept.values[p] - start.values[p] for p in sorted(concept.values)])


def test_training_through_the_executor_on_float16_and_bfloat16_models_learns_what_float32_learns(
        perfusion_dir, small_corpus, tmp_path, monkeypatch):
    """Four steps through ComfyUI's executor with the model and CLIP loaded in each dtype. The node says which
    precision it trains in; the file's tensors are float32; and what was learned (final minus start) points the
    way float32's does: cosine >= 0.9 (Adam normalises each step, so rounding noise in a gradient moves an update
    only where that gradient is near zero; measured 0.991 in float16 and 0.939 in bfloat16, whose 8-bit mantissa
    also rounds the text encodings the word vector learns from, with the well-conditioned C below)."""
    import folder_paths
    import nodes
    from support.comfy_runner import run_prompt
    from perfusion_ops.concept_file import read_concept
    from perfusion_ops.covariance import cached_covariance, load_covariance_file
    from perfusion_ops.train import TrainSettings, train_concept
    register_test_nodes()
    nodes.NODE_CLASS_MAPPINGS["PerfusionTestPhotos"] = PhotoBatch
    cache = tmp_path / "cov"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "perfusion_covariance", ([str(cache)], {".safetensors"}))
    # The tests' corpus (16 captions) leaves C rank-deficient on the tiny CLIP's 768 dimensions, so C⁻¹ (ridge
    # 1e-6) amplifies any rounding of C a million times and the runs would measure that, not their precision.
    # A well-conditioned C (the estimate plus 5% of its mean eigenvalue), given as a covariance file, isolates
    # what the model's dtype does.
    import safetensors.torch
    estimate, _ = cached_covariance(tiny_clip("sd1"), cache)
    conditioned = estimate + 0.05 * estimate.diagonal().mean() * torch.eye(estimate.shape[0], dtype=estimate.dtype)
    safetensors.torch.save_file({"covariance": conditioned.float()}, str(cache / "conditioned.safetensors"))
    folder_paths.filename_list_cache.pop("perfusion_covariance", None)
    learned, texts = {}, {}
    for dtype in ("float32", "float16", "bfloat16"):
        _, outputs = run_prompt(train_graph(f"hugsy_{dtype}", steps=4, dtype=dtype,
                                            covariance="conditioned.safetensors"))
        texts[dtype] = outputs["3"]["text"][0]
        concept = read_concept(perfusion_dir / f"hugsy_{dtype}_00001.safetensors")
        assert all(v.dtype == torch.float32 for v in concept.values.values())
        learned[dtype] = concept
    assert "model in float16" in texts["float16"] and "dynamic loss scaling" in texts["float16"]
    assert "model in bfloat16" in texts["bfloat16"] and "scaling" not in texts["bfloat16"]
    assert "model in float32" in texts["float32"]
    # Where each training started: the same run with nothing learned, on the model in the same dtype.
    images, masks = load_photos("teddy", 64)
    latents = tiny_vae().encode(images)
    C, fingerprint = load_covariance_file(cache / "conditioned.safetensors", estimate.shape[0])

    def learned_by(dtype_name: str) -> torch.Tensor:
        dtype = getattr(torch, dtype_name)
        start, _ = train_concept(tiny_model("sd1", std=0.2, dtype=dtype), tiny_clip("sd1", dtype=dtype), latents,
                                 "hugsy", "teddy", C, fingerprint, TrainSettings(steps=0, gradient_accumulation=1))
        return _learned(learned[dtype_name], start)
    reference = learned_by("float32")
    assert reference.norm() > 0
    for dtype in ("float16", "bfloat16"):
        cosine = float(torch.nn.functional.cosine_similarity(learned_by(dtype), reference, dim=0))
        assert cosine >= 0.9, f"{dtype}: cosine {cosine:.4f} to what float32 learned"
