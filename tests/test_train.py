"""Issue 4: training a concept, the covariance, cancel; through ComfyUI's executor where it matters."""
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from support.tiny_models import register_test_nodes, tiny_clip, tiny_model, tiny_vae

pytestmark = pytest.mark.host

PHOTOS = Path(REPO) / "tests" / "data"  # drawn test photos with masks (tests/data/README.md)


def load_photos(concept="teddy", size=64):
    """The concept's photos and soft masks, centre-cropped to squares by the pack's photo loader:
    IMAGE [N, size, size, 3] and MASK [N, size, size] in 0..1."""
    from perfusion_ops.photos import load_photo_folder
    images, masks, with_masks = load_photo_folder(PHOTOS / concept, size, "crop")
    assert with_masks
    return images, masks


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_covariance_matches_direct_float64_and_is_cached(arch, small_corpus, tmp_path, monkeypatch):
    from perfusion_ops import covariance
    clip = tiny_clip(arch)
    direct, count = None, 0
    tokenizer = next(getattr(clip.tokenizer, a) for a in ("clip_l", "clip_h") if hasattr(clip.tokenizer, a))
    for caption in small_corpus:  # one caption at a time, BOS..EOS counted from the tokenizer itself
        length = len(tokenizer.tokenizer(caption)["input_ids"])
        x = clip.encode_from_tokens(clip.tokenize(caption))[0, :length].double()
        direct = x.T @ x if direct is None else direct + x.T @ x
        count += length
    direct /= count
    C, fingerprint = covariance.cached_covariance(clip, tmp_path)
    assert (C - direct).norm() / direct.norm() < 1e-5
    assert (tmp_path / f"{fingerprint}.safetensors").is_file()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the covariance was estimated again instead of read from the cache")
    monkeypatch.setattr(covariance, "estimate_covariance", must_not_run)
    C_again, fingerprint_again = covariance.cached_covariance(clip, tmp_path)
    # Bit for bit: a run that estimates C and one that reads it from the cache train the same concept.
    assert fingerprint_again == fingerprint and torch.equal(C_again, C)
    # Another clip-skip setting is another setup: a different fingerprint.
    other = clip.clone()
    other.clip_layer(-2)
    assert covariance.text_encoder_fingerprint(other, small_corpus) != fingerprint


def test_the_inverse_covariance_is_positive_definite_even_when_the_cached_c_is_not():
    """A C from few tokens is rank-deficient; cached in float32, its zero eigenvalues become slightly negative,
    here -1e-4 of the mean, a hundred times the ridge. C⁻¹ must still be symmetric positive definite, so that
    E = i*ᵀ C⁻¹ i* > 0 for any i* (adding the ridge to C, the previous way, leaves it indefinite)."""
    from perfusion_ops.covariance import RIDGE, inverse
    d = 64
    g = torch.Generator().manual_seed(0)
    vectors = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    eigenvalues = torch.cat([torch.rand(d - 8, generator=g, dtype=torch.float64) * 100 + 1,
                             torch.full((8,), -1e-4, dtype=torch.float64) * 50])
    C = (vectors * eigenvalues) @ vectors.T
    C_inv = inverse(C.float())
    assert torch.allclose(C_inv, C_inv.T)
    assert torch.linalg.eigvalsh(C_inv).min() > 0
    ridge_added = torch.linalg.inv(C + RIDGE * C.diagonal().mean() * torch.eye(d, dtype=torch.float64))
    assert torch.linalg.eigvalsh(ridge_added).min() < 0, "the control is not indefinite: the test shows nothing"
    # Well covered directions are untouched: C⁻¹ C = 1 on them.
    covered = vectors[:, : d - 8]
    assert torch.allclose(covered.T @ C_inv @ C @ covered, torch.eye(d - 8, dtype=torch.float64), atol=1e-5)


def fixed_denoising_loss(model, clip, concept, latents, masks, draws=8, beta=0.75, tau=0.10):
    """Masked ε-MSE of the model with `concept` applied, on fixed noise draws and sigmas."""
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    patched, patched_clip = apply_concepts(model, [concept], 1.0, beta, tau), clip_with_concepts(clip, [concept])
    context = patched_clip.encode_from_tokens(patched_clip.tokenize(f"a photo of a embedding:{concept.name}"))
    sampling = model.get_model_object("model_sampling")
    g = torch.Generator().manual_seed(1234)
    x0 = model.model.process_latent_in(latents)
    weight = torch.nn.functional.interpolate(masks[:, None], size=x0.shape[-2:], mode="bilinear")
    weight = weight / weight.amax(dim=(2, 3), keepdim=True)
    from comfy.patcher_extension import copy_nested_dicts
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            sigma = sampling.sigma(torch.randint(0, 1000, (x0.shape[0],), generator=g).float())
            noise = torch.randn(x0.shape, generator=g)
            xt = sampling.noise_scaling(sigma, noise, x0)
            options = {"wrappers": copy_nested_dicts(patched.wrappers), "sigmas": sigma[:1]}
            pred = patched.model.apply_model(xt, sigma, c_crossattn=context.expand(x0.shape[0], -1, -1),
                                             transformer_options=options)
            eps = (xt - pred) / sigma.view(-1, 1, 1, 1)
            total += float((((eps - noise) * weight) ** 2).mean())
    return total / draws


def test_training_on_real_photos_lowers_the_loss_and_changes_only_the_concept(small_corpus, tmp_path):
    from perfusion_ops.covariance import cached_covariance, inverse, metric_vector
    from perfusion_ops.train import TrainSettings, train_concept
    model, clip, vae = tiny_model("sd1", std=0.2), tiny_clip("sd1"), tiny_vae()
    images, masks = load_photos("teddy", 64)
    latents = vae.encode(images)
    C, fingerprint = cached_covariance(clip, tmp_path)
    unet_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    clip_before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}

    settings = TrainSettings(steps=24, seed=3, batch_size=2, value_lr=0.03, embedding_lr=0.006,
                             gradient_accumulation=1)
    untrained, _ = train_concept(model, clip, latents, "hugsy", "teddy", C, fingerprint,
                                 TrainSettings(steps=1, seed=3, batch_size=2, value_lr=0.0, embedding_lr=0.0),
                                 masks=masks)
    trained, losses = train_concept(model, clip, latents, "hugsy", "teddy", C, fingerprint, settings, masks=masks,
                                    flipped_latents=vae.encode(torch.flip(images, dims=[2])),
                                    flipped_masks=torch.flip(masks, dims=[2]))
    before = fixed_denoising_loss(model, clip, untrained, latents, masks)
    after = fixed_denoising_loss(model, clip, trained, latents, masks)
    assert after < before * 0.995, f"fixed-draw loss {before:.5f} -> {after:.5f} did not fall"
    assert len(losses) == 24 and all(np.isfinite(losses))

    # Only the concept's word vector and value targets were learned; keys are locked.
    assert not trained.keys
    assert not torch.equal(trained.embeddings["clip_l"], untrained.embeddings["clip_l"])
    assert any(not torch.equal(trained.values[p], untrained.values[p]) for p in trained.values)
    assert torch.equal(trained.u, metric_vector(inverse(C), trained.i_star))
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, unet_before[k]), f"UNet weight {k} changed"
    for k, v in clip.cond_stage_model.state_dict().items():
        assert torch.equal(v, clip_before[k]), f"CLIP weight {k} changed"

    # The gate input of the finished word is recorded (a finite number) in the training settings.
    assert np.isfinite(json.loads(trained.train)["gate_input"])

    # Same seed, same concept.
    again, _ = train_concept(model, clip, latents, "hugsy", "teddy", C, fingerprint, settings, masks=masks,
                             flipped_latents=vae.encode(torch.flip(images, dims=[2])),
                             flipped_masks=torch.flip(masks, dims=[2]))
    assert torch.equal(again.embeddings["clip_l"], trained.embeddings["clip_l"])
    assert all(torch.equal(again.values[p], trained.values[p]) for p in trained.values)


def test_the_superclass_is_encoded_once_per_template_and_the_concept_is_as_if_encoded_every_time(
        small_corpus, tmp_path, monkeypatch):
    """The superclass's encoding in a template never changes (its CLIP is frozen), so training keeps it: each
    superclass prompt is encoded once, and the concept is bit for bit that of a training that encodes it anew
    in every micro-batch."""
    from perfusion_ops import host, train
    from perfusion_ops.covariance import cached_covariance
    model, clip, vae = tiny_model("sd1", std=0.2), tiny_clip("sd1"), tiny_vae()
    images, _ = load_photos("teddy", 64)
    latents = vae.encode(images)
    C, fingerprint = cached_covariance(clip, tmp_path)
    settings = train.TrainSettings(steps=6, seed=2, batch_size=2, gradient_accumulation=2)
    encoded, encode, keep = [], host.encode_with_grad, train._encode_prompts
    monkeypatch.setattr(host, "encode_with_grad", lambda c, prompt: (encoded.append(prompt), encode(c, prompt))[1])

    def superclass_prompts_of_a_training():
        encoded.clear()
        concept, _ = train.train_concept(model, clip, latents, "hugsy", "teddy", C, fingerprint, settings)
        return concept, [p for p in encoded if "embedding:" not in p]
    kept, kept_prompts = superclass_prompts_of_a_training()
    monkeypatch.setattr(train, "_encode_prompts", lambda *args: keep(*args[:-1], {}))  # nothing kept
    anew, anew_prompts = superclass_prompts_of_a_training()
    assert len(kept_prompts) == len(set(kept_prompts)) <= len(train.TEMPLATES) < len(anew_prompts)
    assert set(kept_prompts) == set(anew_prompts)
    assert torch.equal(kept.i_super, anew.i_super) and torch.equal(kept.i_star, anew.i_star)
    assert torch.equal(kept.embeddings["clip_l"], anew.embeddings["clip_l"])
    assert all(torch.equal(kept.values[p], anew.values[p]) for p in anew.values)


def _word_encoding(clip, concept, template: str) -> torch.Tensor:
    """The concept word's context vector in `template`, at its own position, from the CLIP that knows it."""
    from perfusion_ops.text import clip_with_concepts
    from perfusion_ops.host import encode_with_grad
    context, _, positions = encode_with_grad(clip_with_concepts(clip, [concept]), template.format(f"embedding:{concept.name}"))
    return context[0, positions[0]].double()


def test_the_files_i_star_is_the_finished_words_encoding_and_its_gate_input_in_new_prompts_is_recorded(
        small_corpus, tmp_path, caplog):
    """With a word vector that moves fast (embedding_lr 0.05), the moving average of training lags it. The file's
    i* is instead the finished word's mean encoding over the training templates, so its gate input r = uᵀx / uᵀi*
    averages 1 there; `gate_input` records the mean r over prompts it was not trained on (GATE_CHECK_PROMPTS), and
    a far-off value makes training warn, naming the concept and the remedy."""
    from perfusion_ops import train
    from perfusion_ops.covariance import cached_covariance
    model, clip, vae = tiny_model("sd1", std=0.2), tiny_clip("sd1"), tiny_vae()
    images, _ = load_photos("teddy", 64)
    C, fingerprint = cached_covariance(clip, tmp_path)
    settings = train.TrainSettings(steps=4, seed=1, batch_size=2, embedding_lr=0.05, gradient_accumulation=1)
    with caplog.at_level(logging.INFO, logger=train.log.name):
        concept, _ = train.train_concept(model, clip, vae.encode(images), "hugsy", "teddy", C, fingerprint, settings)
    finished = torch.stack([_word_encoding(clip, concept, t) for t in train.TEMPLATES]).mean(0)
    assert torch.allclose(concept.i_star.double(), finished, rtol=1e-5, atol=1e-5)
    start = torch.stack([_word_encoding(clip, concept.replace(embeddings={"clip_l": train._word_embedding(
        clip, "clip_l", train.superclass_tokens(clip, "teddy")["clip_l"])[None]}), t) for t in train.TEMPLATES]).mean(0)
    assert (finished - start).norm() > 0.01 * start.norm(), "the word did not move: the test shows nothing"
    r_templates = [train.own_gate_input(_word_encoding(clip, concept, t), concept.i_star, concept.u)
                   for t in train.TEMPLATES]
    assert abs(sum(r_templates) / len(r_templates) - 1.0) < 1e-3, r_templates
    r_new = [train.own_gate_input(_word_encoding(clip, concept, t), concept.i_star, concept.u)
             for t in train.GATE_CHECK_PROMPTS]
    recorded = json.loads(concept.train)["gate_input"]
    assert abs(recorded - sum(r_new) / len(r_new)) < 1e-4, (recorded, r_new)
    assert "gate input on its own word in new prompts" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        train._check_gate_input("hugsy", 1.0 + train.GATE_INPUT_TOLERANCE * 0.9, [1.0])
        train._check_gate_input("teddo", -0.4, [-0.4])
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warned) == 1 and "'teddo'" in warned[0] and "varied photos" in warned[0], warned


def test_applying_with_a_differently_set_up_clip_warns_naming_both_setups(small_corpus, tmp_path, caplog):
    """Training records the CLIP's setup (text.clip_setup); applying the concept with another clip skip, another
    text encoder or a LoRA on the CLIP warns, naming both; the same setup (also a clone) does not."""
    from perfusion_ops import text, train
    from perfusion_ops.covariance import cached_covariance
    model, clip, vae = tiny_model("sd1", std=0.2), tiny_clip("sd1"), tiny_vae()
    images, _ = load_photos("teddy", 64)
    C, fingerprint = cached_covariance(clip, tmp_path)
    settings = train.TrainSettings(steps=1, seed=1, batch_size=1, gradient_accumulation=1)
    concept, _ = train.train_concept(model, clip, vae.encode(images), "hugsy", "teddy", C, fingerprint, settings)
    assert json.loads(concept.train)["clip_setup"] == text.clip_setup(clip)

    skipped = clip.clone()
    skipped.clip_layer(-2)
    other_encoder = tiny_clip("sd1", seed=5)
    lora_clip = clip.clone()
    lora_clip.add_patches({"clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight":
                           ("diff", (torch.full((128, 768), 0.01),))}, 0.5)
    for other in (skipped, other_encoder, lora_clip):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=text.log.name):
            text.clip_with_concepts(other, [concept])
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "'hugsy'" in warned[0], warned
        assert text.clip_setup(clip) in warned[0] and text.clip_setup(other) in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=text.log.name):
        text.clip_with_concepts(clip.clone(), [concept])
        text.clip_with_concepts(clip, [concept.replace(train="{}")])  # no record: nothing to compare
    assert not caplog.records
    assert "layer -2" in text.clip_setup(skipped) and "patched weights" in text.clip_setup(lora_clip)


def test_superclass_of_several_tokens_is_refused_clearly():
    from perfusion_ops.errors import PerfusionError
    from perfusion_ops.train import superclass_tokens
    clip = tiny_clip("sd1")
    assert len(superclass_tokens(clip, "teddy")) == 1
    with pytest.raises(PerfusionError, match="one word"):
        superclass_tokens(clip, "teddy bear")
    with pytest.raises(PerfusionError, match="split into"):
        superclass_tokens(clip, "perfusionish")


class PhotoBatch:
    """Test-only node: the test photos and masks (tests/data) as IMAGE and MASK batches."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"concept": ("STRING", {"default": "teddy"}), "size": ("INT", {"default": 64})},
                "optional": {"portrait_border": ("INT", {"default": 0})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, concept, size, portrait_border=0):
        """With `portrait_border`, portrait photos: that many striped rows above and below each square photo
        (mask 0 there)."""
        images, masks = load_photos(concept, size)
        if portrait_border:
            n, _, width, _ = images.shape
            stripes = torch.linspace(0, 1, portrait_border * width * 3).reshape(1, portrait_border, width, 3)
            images = torch.cat([stripes.expand(n, -1, -1, -1), images, stripes.flip(1).expand(n, -1, -1, -1)], dim=1)
            masks = torch.nn.functional.pad(masks, (0, 0, portrait_border, portrait_border))
        return images, masks


def train_graph(name, steps, masks=True, save=True, arch="sd1", dtype="float32", accumulation=1, **inputs):
    """Photos, train and (optionally) save, on the tiny model loaded in `dtype`; one micro-batch per step unless
    `accumulation` says otherwise (the node's default, 4, would only make these tests slower)."""
    graph = {
        "1": {"class_type": "PerfusionTestTinyCheckpoint",
              "inputs": {"arch": arch, "seed": 0, "weight_std": 0.2, "dtype": dtype}},
        "2": {"class_type": "PerfusionTestPhotos", "inputs": {"concept": "teddy", "size": 64}},
        "3": {"class_type": "PerfusionTrainConcept", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "name": name,
            "superclass": "teddy", "steps": steps, "seed": 1, "batch_size": 2, "resolution": 64, "preview_every": 2,
            "gradient_accumulation": accumulation, **inputs}},
    }
    if masks:
        graph["3"]["inputs"]["masks"] = ["2", 1]
    if save:
        graph["4"] = {"class_type": "PerfusionSaveConcept", "inputs": {"concept": ["3", 0], "filename_prefix": "{name}"}}
    return graph


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_train_save_load_apply_through_the_executor(arch, perfusion_dir, small_corpus, tmp_path, monkeypatch):
    import folder_paths
    import nodes
    from support.comfy_runner import run_prompt
    from perfusion_ops.concept_file import read_concept
    register_test_nodes()
    nodes.NODE_CLASS_MAPPINGS["PerfusionTestPhotos"] = PhotoBatch
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "perfusion_covariance", ([str(tmp_path / "cov")], {".safetensors"}))
    run_prompt(train_graph("hugsy", steps=4, arch=arch))
    saved = sorted(perfusion_dir.glob("*.safetensors"))
    assert [p.name for p in saved] == ["hugsy_00001.safetensors"]
    concept = read_concept(saved[0])
    assert concept.name == "hugsy" and concept.superclass == "teddy" and concept.arch == arch
    assert not concept.keys and concept.i_super.norm() > 0 and concept.covariance
    assert set(concept.embeddings) == {"sd1": {"clip_l"}, "sdxl": {"clip_l", "clip_g"}}[arch]

    # The saved concept loads, applies and its embedding changes the conditioning.
    folder_paths.filename_list_cache.pop("perfusion", None)
    graph = {
        "1": {"class_type": "PerfusionTestTinyCheckpoint", "inputs": {"arch": arch, "seed": 0, "weight_std": 0.2}},
        "5": {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": saved[0].name}},
        "6": {"class_type": "PerfusionApplyConcept", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concept": ["5", 0],
              "strength": 1.0, "beta": 0.7, "tau": 0.15, "start_at": 0.0, "end_at": 1.0}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 1], "text": "a photo of embedding:hugsy"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of embedding:hugsy"}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["6", 0], "positive": ["7", 0], "negative": ["8", 0],
               "latent_image": ["9", 0], "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
               "scheduler": "normal", "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }
    executor, outputs = run_prompt(graph)
    assert outputs["12"]["images"]
    # The CLIP the apply node returns reads embedding:hugsy as the saved word vectors, exactly as ComfyUI's own
    # textual-inversion loader reads them from an embedding file; and the word moved away from the superclass's.
    import safetensors.torch
    from perfusion_ops.text import clip_with_concepts
    embedding_folder = tmp_path / "embeddings"
    embedding_folder.mkdir()
    safetensors.torch.save_file({encoder: vector.contiguous() for encoder, vector in concept.embeddings.items()},
                                str(embedding_folder / "hugsy.safetensors"))
    encoded = lambda clip, text: clip.encode_from_tokens(clip.tokenize(text))  # noqa: E731
    ours = encoded(clip_with_concepts(tiny_clip(arch, embedding_directory=[]), [concept]), "a photo of embedding:hugsy")
    hosts = encoded(tiny_clip(arch, embedding_directory=[str(embedding_folder)]), "a photo of embedding:hugsy")
    assert torch.equal(ours, hosts)
    superclass = encoded(tiny_clip(arch, embedding_directory=[]), "a photo of teddy")
    assert ours.shape == superclass.shape and not torch.allclose(ours, superclass)


@pytest.mark.parametrize("save_on_cancel", [False, True])
def test_cancel_keeps_no_file_or_a_clearly_named_one_and_no_changed_model(save_on_cancel, perfusion_dir, small_corpus,
                                                                         tmp_path, monkeypatch):
    import comfy.model_management
    import comfy.utils
    import folder_paths
    import nodes
    from support.comfy_runner import cached_outputs, new_executor
    import execution
    import asyncio
    register_test_nodes()
    nodes.NODE_CLASS_MAPPINGS["PerfusionTestPhotos"] = PhotoBatch
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "perfusion_covariance", ([str(tmp_path / "cov")], {".safetensors"}))
    original_update = comfy.utils.ProgressBar.update_absolute

    def cancel_at_step_3(self, value, total=None, preview=None):
        original_update(self, value, total, preview)
        if value == 3:
            comfy.model_management.interrupt_current_processing(True)  # what the Cancel button does
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", cancel_at_step_3)

    prompt = train_graph("cancelled", steps=50, save_on_cancel=save_on_cancel)
    valid, error, outputs, _ = asyncio.run(execution.validate_prompt("cancel", prompt, None))
    assert valid, error
    executor = new_executor()
    executor.execute(prompt, "cancel", extra_data={}, execute_outputs=outputs)
    comfy.model_management.interrupt_current_processing(False)
    assert not executor.success
    assert executor.status_messages[-1][0] == "execution_interrupted"
    files = sorted(p.relative_to(perfusion_dir).as_posix() for p in perfusion_dir.rglob("*.safetensors"))
    if save_on_cancel:
        # Cancelled while step 3 reported: measured, the run stops after 3 steps on v0.33.0 and 4 on v0.3.64 (where
        # the node notices before the next step). The file is named after them, never under the final name.
        assert len(files) == 1, files
        match = re.fullmatch(r"cancelled_snapshots/cancelled_cancelled_step(\d{5})_00001\.safetensors", files[0])
        assert match and int(match.group(1)) in (3, 4), files
        from perfusion_ops.concept_file import read_concept
        record = json.loads(read_concept(perfusion_dir / files[0]).train)
        assert record["steps_done"] == int(match.group(1)) and record["cancelled"] is True
    else:
        assert files == [], "a cancelled training left files behind"
    assert not list(perfusion_dir.rglob("*.tmp*")), "a half-written file was left behind"
    # The loaded model (from the executor's cache) samples exactly as a fresh load does.
    cached_model = cached_outputs(executor, "1")[0][0]
    fresh = tiny_model("sd1", std=0.2)
    for (k, v), (k2, v2) in zip(sorted(cached_model.model.state_dict().items()), sorted(fresh.model.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), f"{k} changed by the cancelled run"
    assert not cached_model.weight_wrapper_patches and not cached_model.object_patches


def test_snapshots_every_n_steps_and_resume_continues_from_the_file(perfusion_dir, small_corpus, tmp_path,
                                                                    monkeypatch):
    """save_every writes the concept as it is at steps N, 2N, ... (the last equals the final concept); resume_from
    starts from a file's word vector and values: with zero learning rates the result keeps them exactly."""
    import folder_paths
    import nodes
    from support.comfy_runner import run_prompt
    from perfusion_ops.concept_file import read_concept
    register_test_nodes()
    nodes.NODE_CLASS_MAPPINGS["PerfusionTestPhotos"] = PhotoBatch
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "perfusion_covariance", ([str(tmp_path / "cov")], {".safetensors"}))
    run_prompt(train_graph("hugsy", steps=4, save_every=2))
    snapshots = sorted(p.relative_to(perfusion_dir).as_posix() for p in (perfusion_dir / "hugsy_snapshots").iterdir())
    assert snapshots == ["hugsy_snapshots/hugsy_step00002_00001.safetensors",
                         "hugsy_snapshots/hugsy_step00004_00001.safetensors"], snapshots
    at_2, at_4 = (read_concept(perfusion_dir / name) for name in snapshots)
    final = read_concept(perfusion_dir / "hugsy_00001.safetensors")
    assert [json.loads(c.train)["steps_done"] for c in (at_2, at_4, final)] == [2, 4, 4]
    assert torch.equal(at_4.embeddings["clip_l"], final.embeddings["clip_l"])
    assert all(torch.equal(at_4.values[p], final.values[p]) for p in final.values)
    assert not torch.equal(at_2.embeddings["clip_l"], final.embeddings["clip_l"])

    # Resume from the step-2 snapshot with zero learning rates: the file's tensors come through unchanged.
    folder_paths.filename_list_cache.pop("perfusion", None)
    graph = train_graph("hugsy", steps=2, value_lr=0.0, embedding_lr=0.0, resume_from=["5", 0])
    graph["5"] = {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": snapshots[0]}}
    graph["4"]["inputs"]["filename_prefix"] = "resumed"
    run_prompt(graph)
    resumed = read_concept(perfusion_dir / "resumed_00001.safetensors")
    assert torch.equal(resumed.embeddings["clip_l"], at_2.embeddings["clip_l"])
    assert all(torch.equal(resumed.values[p], at_2.values[p]) for p in at_2.values)
    assert torch.allclose(resumed.i_star, at_2.i_star, atol=1e-5)
    # i_super goes on as a moving average (1% per micro-batch) from the file's
    assert 0 < (resumed.i_super - at_2.i_super).norm() < 0.03 * at_2.i_super.norm()
    record = json.loads(resumed.train)
    assert record["resumed_after_steps"] == 2 and record["steps_done"] == 4
    # With learning rates, continuing the snapshot differs from starting over with the same seed.
    folder_paths.filename_list_cache.pop("perfusion", None)
    graph = train_graph("hugsy", steps=2, resume_from=["5", 0])
    graph["5"] = {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": snapshots[0]}}
    graph["4"]["inputs"]["filename_prefix"] = "continued"
    run_prompt(graph)
    continued = read_concept(perfusion_dir / "continued_00001.safetensors")
    assert not torch.equal(continued.embeddings["clip_l"], at_2.embeddings["clip_l"])


def test_validation_renders_show_the_concept_as_it_is_at_their_step(perfusion_dir, small_corpus, tmp_path,
                                                                  monkeypatch):
    """validate_every 3 over 4 steps renders at step 3 and at the end. Each render is what a user gets from the
    stock graph (Apply Concept, CLIP Text Encode, KSampler euler/normal cfg 7, VAE Decode) with the concept of
    that step, here the saved step-3 snapshot and the final file; the renders leave the training itself alone
    (the same concept as a run without them); they come out captioned, and show on the node."""
    import folder_paths
    import nodes
    from support.comfy_runner import cached_outputs, run_prompt
    from perfusion_ops.concept_file import read_concept
    register_test_nodes()
    nodes.NODE_CLASS_MAPPINGS["PerfusionTestPhotos"] = PhotoBatch
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "perfusion_covariance", ([str(tmp_path / "cov")], {".safetensors"}))
    prompt = "a photo of embedding:hugsy on a beach"
    executor, ui = run_prompt(train_graph("hugsy", steps=4, save_every=3, validation_prompt=prompt, validate_every=3,
                                          validation_steps=2))
    renders = cached_outputs(executor, "3")[2][0]
    assert renders.shape[0] == 2 and renders.shape[2:] == (64, 3) and renders.shape[1] > 64, renders.shape
    assert len(ui["3"]["images"]) == 2, ui["3"]  # shown on the node
    captions = renders[:, 64:]
    assert all(caption.max() > 0.5 for caption in captions), "a caption strip is blank"
    assert not torch.equal(captions[0], captions[1]), "the two captions say the same"

    folder_paths.filename_list_cache.pop("perfusion", None)
    concepts = ["hugsy_snapshots/hugsy_step00003_00001.safetensors", "hugsy_00001.safetensors"]
    for index, concept_file in enumerate(concepts):
        graph = {
            "1": {"class_type": "PerfusionTestTinyCheckpoint", "inputs": {"arch": "sd1", "seed": 0, "weight_std": 0.2,
                                                                          "dtype": "float32"}},
            "5": {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": concept_file}},
            "6": {"class_type": "PerfusionApplyConcept", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "concept": ["5", 0], "strength": 1.0, "beta": 0.7, "tau": 0.15,
                "start_at": 0.0, "end_at": 1.0}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 1], "text": prompt}},
            "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 1], "text": ""}},
            "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "10": {"class_type": "KSampler", "inputs": {
                "model": ["6", 0], "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0], "seed": 1,
                "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
            "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
        }
        stock_executor, _ = run_prompt(graph)
        stock = cached_outputs(stock_executor, "11")[0][0]
        assert torch.allclose(renders[index, :64], stock, atol=1e-5), \
            f"render {index} differs from the stock graph's with {concept_file}: {(renders[index, :64] - stock).abs().max()}"
    assert not torch.allclose(renders[0, :64], renders[1, :64], atol=1e-3), "step 3 and step 4 render alike"

    # The same training without renders gives the same concept, bit for bit.
    run_prompt(train_graph("hugsy", steps=4))
    plain, validated = (read_concept(perfusion_dir / f) for f in ("hugsy_00002.safetensors", concepts[1]))
    assert torch.equal(plain.embeddings["clip_l"], validated.embeddings["clip_l"])
    assert all(torch.equal(plain.values[p], validated.values[p]) for p in plain.values)

    # No validation prompt: an empty batch, nothing shown.
    executor, ui = run_prompt(train_graph("hugsy", steps=1, validate_every=1))
    assert cached_outputs(executor, "3")[2][0].shape[0] == 0 and "images" not in ui.get("3", {})


def test_crop_trains_on_the_centred_square_of_portrait_photos(perfusion_dir, small_corpus, tmp_path, monkeypatch):
    """fit=crop on portrait photos (the square test photos with striped rows above and below) trains exactly
    the concept of the square photos themselves; squash (the reference recipe) stretches them and differs."""
    import folder_paths
    import nodes
    from support.comfy_runner import run_prompt
    from perfusion_ops.concept_file import read_concept
    register_test_nodes()
    nodes.NODE_CLASS_MAPPINGS["PerfusionTestPhotos"] = PhotoBatch
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "perfusion_covariance", ([str(tmp_path / "cov")], {".safetensors"}))
    runs = {"square": (0, "crop"), "portrait_crop": (16, "crop"), "portrait_squash": (16, "squash")}
    for name, (border, fit) in runs.items():
        graph = train_graph(name, steps=2, fit=fit)
        graph["2"]["inputs"]["portrait_border"] = border
        run_prompt(graph)
    square, cropped, squashed = (read_concept(perfusion_dir / f"{name}_00001.safetensors") for name in runs)
    assert torch.equal(cropped.embeddings["clip_l"], square.embeddings["clip_l"])
    assert all(torch.equal(cropped.values[p], square.values[p]) for p in square.values)
    assert not torch.equal(squashed.embeddings["clip_l"], square.embeddings["clip_l"])


def test_train_node_refuses_bad_input_clearly():
    """No images, masks that do not match, a bad name, a model without cross-attention: clear errors."""
    import nodes
    from perfusion_ops.errors import PerfusionError
    node = nodes.NODE_CLASS_MAPPINGS["PerfusionTrainConcept"]
    model, clip, vae = tiny_model("sd1"), tiny_clip("sd1"), tiny_vae()
    images = torch.rand(2, 64, 64, 3)
    common = dict(model=model, clip=clip, vae=vae, superclass="teddy", steps=1, seed=0)
    with pytest.raises(ValueError, match="No images"):
        node.execute(images=images[:0], name="hugsy", **common)
    with pytest.raises(ValueError, match="3 masks for 2 images"):
        node.execute(images=images, masks=torch.rand(3, 64, 64), name="hugsy", **common)
    with pytest.raises(ValueError, match="name must be one word"):
        node.execute(images=images, name="my teddy", **common)
    no_cross_attention = model.clone()
    no_cross_attention.model = torch.nn.Module()  # e.g. a model family without text cross-attention
    no_cross_attention.model.diffusion_model = torch.nn.Linear(2, 2)
    with pytest.raises(PerfusionError, match="no cross-attention"):
        node.execute(images=images, name="hugsy", **{**common, "model": no_cross_attention})
