"""The Load, Save and Apply nodes through ComfyUI's own executor, with real graphs.

Graphs run in-process (comfy_runner) on tiny random models from the test-only loader node. Latents are
taken out of a graph by a test-only output node that stores its input in CAPTURED.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys

import pytest
import safetensors.torch
import torch

from support.comfy_runner import run_prompt, run_prompt_expecting_error
from reference import random_concept
from support.tiny_models import register_test_nodes, tiny_clip, tiny_model

pytestmark = pytest.mark.host

NAME = "sksteddy"
TEXT = f"a photo of embedding:{NAME}"
PLAIN_TEXT = "a photo of a teddy"
CAPTURED: dict = {}


# ---------------------------------------------------------------- test-only nodes

def _capture_node(io_type: str):
    class Capture:
        """Stores its input in CAPTURED[key] (an output node, so the graph runs up to it)."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": (io_type,), "key": ("STRING", {"default": "out"})}}

        RETURN_TYPES = ()
        FUNCTION = "capture"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        def capture(self, value, key):
            CAPTURED[key] = value["samples"].clone() if io_type == "LATENT" else value
            return {"ui": {"captured": [key]}}
    return Capture


def _after_node(io_type: str):
    class After:
        """Passes `value` through unchanged once `after` exists: forces an order of execution in a graph."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": (io_type,), "after": ("LATENT",)}}

        RETURN_TYPES = (io_type,)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, value, after):
            return (value,)
    return After


TEST_NODES = {
    "PerfusionTestCaptureLatent": _capture_node("LATENT"),
    "PerfusionTestCaptureConcept": _capture_node("PERFUSION_CONCEPT"),
    "PerfusionTestCaptureModel": _capture_node("MODEL"),
    "PerfusionTestCaptureConditioning": _capture_node("CONDITIONING"),
    "PerfusionTestAfterModel": _after_node("MODEL"),
    "PerfusionTestAfterClip": _after_node("CLIP"),
    "PerfusionTestAfterLatent": _after_node("LATENT"),
}


@pytest.fixture(scope="module", autouse=True)
def test_nodes():
    import nodes
    register_test_nodes()
    nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
    yield
    for node_id in TEST_NODES:
        nodes.NODE_CLASS_MAPPINGS.pop(node_id, None)


@pytest.fixture(autouse=True)
def clear_captured():
    CAPTURED.clear()
    yield
    CAPTURED.clear()


# ---------------------------------------------------------------- concepts and files

@pytest.fixture(scope="module")
def concept():
    """An SD1 concept for the tiny SD1 model whose i* is the encoding of embedding:<NAME> in TEXT, so that
    token opens the gate in the graph (the loader node builds the same model and CLIP from seed 0)."""
    from perfusion_ops.text import clip_with_concepts
    model = tiny_model("sd1")
    words = random_concept(model, "sd1", NAME, seed=1)
    clip = clip_with_concepts(tiny_clip("sd1", 0, embedding_directory=[]), [words])
    with torch.no_grad():
        context = clip.encode_from_tokens(clip.tokenize(TEXT))  # BOS a photo of <concept> ...
    return random_concept(model, "sd1", NAME, seed=2, context=context, position=4).replace(
        embeddings=words.embeddings)


def _write(concept, folder, filename="concept.safetensors"):
    from perfusion_ops.concept_file import write_concept
    write_concept(concept, folder / filename)
    return filename


def _snapshot(folder) -> dict:
    """Every entry under `folder` with its size, mtime and content hash."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, digest)
    return out


def assert_same_concept(a, b):
    for field in ("name", "superclass", "arch", "beta", "tau", "covariance", "train"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("i_star", "u", "i_super"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    for field in ("embeddings", "values", "keys"):
        da, db = getattr(a, field), getattr(b, field)
        assert da.keys() == db.keys(), field
        for k in da:
            assert torch.equal(da[k], db[k]), f"{field}[{k}]"


# ---------------------------------------------------------------- graph building

def _ksampler(model, positive, negative, latent, seed=3):
    return {"class_type": "KSampler", "inputs": {"model": model, "positive": positive, "negative": negative,
                                                 "latent_image": latent, "seed": seed, "steps": 2, "cfg": 5.0,
                                                 "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}


def _encode(clip, text):
    return {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}}


def _capture(value, key, kind="Latent"):
    return {"class_type": f"PerfusionTestCapture{kind}", "inputs": {"value": value, "key": key}}


def _loader(arch="sd1", std=0.2):
    return {"class_type": "PerfusionTestTinyCheckpoint", "inputs": {"arch": arch, "seed": 0, "weight_std": std}}


def _load(filename):
    return {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": filename}}


def _apply(model, clip, concept, strength=1.0):
    return {"class_type": "PerfusionApplyConcept",
            "inputs": {"model": model, "clip": clip, "concept": concept, "strength": strength, "beta": 0.7,
                       "tau": 0.15, "start_at": 0.0, "end_at": 1.0}}


# ---------------------------------------------------------------- apply in a graph

def test_apply_in_a_graph_changes_the_sample_strength_zero_does_not_and_the_input_model_stays(
        perfusion_dir, concept):
    filename = _write(concept, perfusion_dir)
    base_model, base_clip = ["ckpt", 0], ["ckpt", 1]
    prompt = {
        "ckpt": _loader(),
        "load": _load(filename),
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "neg": _encode(base_clip, ""),
        "pos_base": _encode(base_clip, TEXT),
        # The base model is sampled before the apply node runs (its MODEL input waits for this sample) ...
        "k_base_before": _ksampler(base_model, ["pos_base", 0], ["neg", 0], ["empty", 0]),
        "cap_base_before": _capture(["k_base_before", 0], "base_before"),
        "model_after_base": {"class_type": "PerfusionTestAfterModel",
                             "inputs": {"value": base_model, "after": ["k_base_before", 0]}},
        "apply": _apply(["model_after_base", 0], base_clip, ["load", 0]),
        "pos_patched": _encode(["apply", 1], TEXT),
        "k_patched": _ksampler(["apply", 0], ["pos_patched", 0], ["neg", 0], ["empty", 0]),
        "cap_patched": _capture(["k_patched", 0], "patched"),
        # ... and again after the patched model has sampled; likewise the base CLIP encodes the prompt again.
        "latent_after_patched": {"class_type": "PerfusionTestAfterLatent",
                                 "inputs": {"value": ["empty", 0], "after": ["k_patched", 0]}},
        "k_base_after": _ksampler(base_model, ["pos_base", 0], ["neg", 0], ["latent_after_patched", 0]),
        "cap_base_after": _capture(["k_base_after", 0], "base_after"),
        "cap_base_model": _capture(base_model, "base_model", kind="Model"),
        "cap_pos_base": _capture(["pos_base", 0], "pos_base", kind="Conditioning"),
        "clip_after_patched": {"class_type": "PerfusionTestAfterClip",
                               "inputs": {"value": base_clip, "after": ["k_patched", 0]}},
        "pos_base_again": _encode(["clip_after_patched", 0], TEXT),
        "cap_pos_base_again": _capture(["pos_base_again", 0], "pos_base_again", kind="Conditioning"),
        # The concept's word through the patched CLIP, but the unpatched model: isolates the model's edit.
        "k_words_only": _ksampler(base_model, ["pos_patched", 0], ["neg", 0], ["empty", 0]),
        "cap_words_only": _capture(["k_words_only", 0], "words_only"),
        # Strength 0: the MODEL output is the input model exactly, even with the concept's token in the prompt.
        "apply_zero": _apply(["model_after_base", 0], base_clip, ["load", 0], strength=0.0),
        "pos_zero": _encode(["apply_zero", 1], TEXT),
        "k_zero": _ksampler(["apply_zero", 0], ["pos_zero", 0], ["neg", 0], ["empty", 0]),
        "cap_zero": _capture(["k_zero", 0], "zero"),
        "k_zero_ref": _ksampler(base_model, ["pos_zero", 0], ["neg", 0], ["empty", 0]),
        "cap_zero_ref": _capture(["k_zero_ref", 0], "zero_ref"),
        # Strength 0, whole node (MODEL and CLIP) against no apply node at all, prompt without the concept.
        "pos_zero_plain": _encode(["apply_zero", 1], PLAIN_TEXT),
        "k_zero_plain": _ksampler(["apply_zero", 0], ["pos_zero_plain", 0], ["neg", 0], ["empty", 0]),
        "cap_zero_plain": _capture(["k_zero_plain", 0], "zero_plain"),
        "pos_plain": _encode(base_clip, PLAIN_TEXT),
        "k_plain": _ksampler(base_model, ["pos_plain", 0], ["neg", 0], ["empty", 0]),
        "cap_plain": _capture(["k_plain", 0], "plain"),
    }
    _, outputs = run_prompt(prompt)

    c = CAPTURED
    assert set(c) == {"base_before", "patched", "base_after", "base_model", "pos_base", "pos_base_again",
                      "words_only", "zero", "zero_ref", "zero_plain", "plain"}
    assert c["patched"].shape == (1, 4, 8, 8) and torch.isfinite(c["patched"]).all()
    assert not torch.equal(c["patched"], c["base_before"]), "applying the concept did not change the sample"
    assert not torch.equal(c["patched"], c["words_only"]), "the patched MODEL did nothing beyond the word vector"
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(c["patched"], c["base_before"]) > 1e-2 and rel(c["patched"], c["words_only"]) > 1e-2
    # The input MODEL is untouched by the apply node and by sampling its clone.
    assert torch.equal(c["base_before"], c["base_after"])
    assert c["base_model"].get_wrappers("diffusion_model", "perfusion") == []
    # ... and so is the input CLIP: it still does not know the concept's word.
    assert torch.equal(c["pos_base"][0][0], c["pos_base_again"][0][0])
    # Strength 0 is bit-identical to no apply node.
    assert torch.equal(c["zero"], c["zero_ref"])
    assert torch.equal(c["zero_plain"], c["plain"])
    # The nodes say what they loaded and with which settings.
    assert NAME in outputs["load"]["text"][0] and "sd1" in outputs["load"]["text"][0]
    assert any(f"embedding:{NAME}" in line for line in outputs["apply"]["text"])


# ---------------------------------------------------------------- save

def _default_prefix() -> str:
    """The widget default a workflow carries for filename_prefix (API prompts always hold every widget)."""
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["PerfusionSaveConcept"].INPUT_TYPES()["required"]["filename_prefix"][1]["default"]


def _save_prompt(filename, prefix=None):
    inputs = {"concept": ["load", 0], "filename_prefix": _default_prefix() if prefix is None else prefix}
    return {"load": _load(filename), "save": {"class_type": "PerfusionSaveConcept", "inputs": inputs}}


def test_save_writes_numbered_files_that_read_back_equal_and_are_listed(perfusion_dir, concept):
    import folder_paths
    from perfusion_ops.concept_file import read_concept
    filename = _write(concept, perfusion_dir)
    original = read_concept(perfusion_dir / filename)
    assert_same_concept(original, concept)

    assert _default_prefix() == "{name}"
    _, outputs = run_prompt(_save_prompt(filename))  # filename_prefix at its default
    assert outputs["save"]["text"] == [f"{NAME}_00001.safetensors"]
    _, outputs = run_prompt(_save_prompt(filename))
    assert outputs["save"]["text"] == [f"{NAME}_00002.safetensors"]

    assert sorted(p.name for p in perfusion_dir.iterdir()) == \
        sorted([filename, f"{NAME}_00001.safetensors", f"{NAME}_00002.safetensors"])
    for saved in (f"{NAME}_00001.safetensors", f"{NAME}_00002.safetensors"):
        assert_same_concept(read_concept(perfusion_dir / saved), original)
        assert saved in folder_paths.get_filename_list("perfusion")

    # A sub-folder prefix is created inside models/perfusion and listed as sub/file.
    _, outputs = run_prompt(_save_prompt(filename, "mine/{name}_v"))
    assert outputs["save"]["text"] == [f"mine/{NAME}_v_00001.safetensors"]
    assert f"mine/{NAME}_v_00001.safetensors" in folder_paths.get_filename_list("perfusion")


@pytest.mark.parametrize("prefix", ["../escaped", "..", "{name}/../../escaped", "sub/../../escaped",
                                    "..\\escaped", "/tmp/perfusion_test_absolute/escaped", "   "])
def test_save_refuses_a_prefix_outside_the_concept_folder(perfusion_dir, concept, prefix):
    filename = _write(concept, perfusion_dir)
    root = perfusion_dir.parents[1]  # tmp_path: holds models/, output/, temp/
    before = _snapshot(root)
    message = run_prompt_expecting_error(_save_prompt(filename, prefix))
    assert "must be a relative name inside models/perfusion" in message, message
    assert _snapshot(root) == before
    assert not (root.parent / "escaped_00001.safetensors").exists()
    assert not os.path.exists("/tmp/perfusion_test_absolute")


def test_save_refuses_a_concept_name_that_would_leave_the_folder(perfusion_dir, concept):
    """The default prefix is the concept's own name, which comes from an untrusted file: such a name is
    refused when the file is read, so it never reaches the save path."""
    filename = _write(concept, perfusion_dir)
    path = perfusion_dir / filename
    path.write_bytes(_resave(path.read_bytes(), meta={"perfusion.name": "../../escaped"}))
    root = perfusion_dir.parents[1]
    before = _snapshot(root)
    message = run_prompt_expecting_error(_save_prompt(filename))
    assert "may only use letters, digits" in message, message
    assert _snapshot(root) == before
    assert not (root.parent / "escaped_00001.safetensors").exists()


# ---------------------------------------------------------------- refusals through the load node

def _parts(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    return {k: v.clone() for k, v in safetensors.torch.load(data).items()}, meta


def _resave(data: bytes, tensors=None, meta=None, drop=(), drop_meta=()):
    t, m = _parts(data)
    t.update(tensors or {})
    m.update(meta or {})
    for k in drop:
        del t[k]
    for k in drop_meta:
        del m[k]
    return safetensors.torch.save(t, m)


def _torch_save(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _with(data, key, index, value):
    t, _ = _parts(data)
    x = t[key].clone()
    x.view(-1)[index] = value
    return _resave(data, {key: x})


VALUE = "value.input_blocks.1.1.transformer_blocks.0.attn2"
BAD_FILES = {
    # id: (bytes from the good file's bytes, substrings the message must contain)
    "not_safetensors": (lambda d: b"This is a text file, not a concept.\n" * 8, ["not a safetensors file"]),
    "empty": (lambda d: b"", ["empty"]),
    "pickle_zip": (lambda d: _torch_save({"u": torch.ones(768)}), ["pickle"]),
    "pickle_legacy": (lambda d: _torch_save({"u": torch.ones(768)}, _use_new_zipfile_serialization=False),
                      ["pickle"]),
    "truncated_data": (lambda d: d[:-100], ["truncated"]),
    "truncated_header": (lambda d: d[:40], ["truncated"]),
    "missing_key": (lambda d: _resave(d, drop=["u"]), ["missing tensors", "u"]),
    "missing_embedding": (lambda d: _resave(d, drop=["embedding.clip_l"]), ["missing tensors", "embedding.clip_l"]),
    "extra_key": (lambda d: _resave(d, {"bogus": torch.zeros(3)}), ["unexpected tensors", "bogus"]),
    "wrong_shape": (lambda d: _resave(d, {"u": torch.ones(767)}), ["u has shape [767]", "768"]),
    "wrong_embedding_width": (lambda d: _resave(d, {"embedding.clip_l": torch.ones(1, 1024)}),
                              ["embedding.clip_l has shape [1, 1024]"]),
    "float64": (lambda d: _resave(d, {"u": torch.ones(768, dtype=torch.float64)}), ["F64", "F32 and F16"]),
    "nan": (lambda d: _with(d, "i_star", 3, float("nan")), ["i_star", "NaN or Inf"]),
    "inf": (lambda d: _with(d, VALUE, 0, float("inf")), [VALUE, "NaN or Inf"]),
    "format_version_unknown": (lambda d: _resave(d, meta={"perfusion.format": "2"}),
                               ["format version '2' is not supported"]),
    "no_format": (lambda d: _resave(d, drop_meta=["perfusion.format"]), ["not a Perfusion concept file"]),
    "unknown_arch": (lambda d: _resave(d, meta={"perfusion.arch": "sd3"}), ["unknown architecture", "sd3"]),
    "tau_not_a_number": (lambda d: _resave(d, meta={"perfusion.tau": "soft"}), ["perfusion.tau", "not a number"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_load_node_refuses_a_bad_file_clearly_and_leaves_the_folder_alone(perfusion_dir, concept, case):
    from perfusion_ops.concept_file import concept_to_bytes
    make, expected = BAD_FILES[case]
    (perfusion_dir / "bad.safetensors").write_bytes(make(concept_to_bytes(concept)))
    root = perfusion_dir.parent
    before = _snapshot(root)
    message = run_prompt_expecting_error({"load": _load("bad.safetensors"),
                                          "out": _capture(["load", 0], "concept", kind="Concept")})
    assert "Cannot read Perfusion concept" in message and "bad.safetensors" in message, message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert "Traceback" not in message and len(message) < 1000
    assert "concept" not in CAPTURED
    assert _snapshot(root) == before


def test_load_node_offers_only_safetensors_files_and_refuses_others_by_name(perfusion_dir, concept):
    """ComfyUI v0.3.64 does not check a V3 combo value against its options when it validates a prompt (v0.33.0
    does), so a hand-written prompt can name any file: the node itself refuses names outside its list, never
    unpickling. On either host the prompt fails naming the file."""
    import folder_paths
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["PerfusionLoadConcept"]
    _write(concept, perfusion_dir)
    (perfusion_dir / "old.pt").write_bytes(_torch_save({"u": torch.ones(768)}))
    assert folder_paths.get_filename_list("perfusion") == ["concept.safetensors"]
    before = _snapshot(perfusion_dir.parent)
    for name in ("old.pt", "missing.safetensors"):
        message = run_prompt_expecting_error({"load": _load(name),
                                              "out": _capture(["load", 0], "concept", kind="Concept")})
        assert name in message and ("is not a concept file" in message or "not in ['concept.safetensors']" in message), message
        with pytest.raises(ValueError, match=f"'{name}' is not a concept file"):  # the node's own guard, on both hosts
            node.execute(name)
    assert "concept" not in CAPTURED
    assert _snapshot(perfusion_dir.parent) == before


def test_sd1_concept_on_an_sdxl_model_is_refused_naming_both(perfusion_dir, concept):
    filename = _write(concept, perfusion_dir)
    before = _snapshot(perfusion_dir.parent)
    message = run_prompt_expecting_error({
        "ckpt": _loader("sdxl", std=0.02), "load": _load(filename),
        "apply": _apply(["ckpt", 0], ["ckpt", 1], ["load", 0]),
        "out": _capture(["apply", 0], "model", kind="Model")})
    assert "SD1" in message and "SDXL" in message and NAME in message, message
    assert "model" not in CAPTURED
    assert _snapshot(perfusion_dir.parent) == before


def test_concept_for_another_layer_width_is_refused_at_apply(perfusion_dir, concept):
    """A file that reads fine but whose value width does not fit the model's layer."""
    layer = VALUE[len("value."):]
    filename = _write(concept.replace(values={**concept.values, layer: torch.ones(321)}), perfusion_dir)
    message = run_prompt_expecting_error({
        "ckpt": _loader("sd1", std=0.02), "load": _load(filename),
        "apply": _apply(["ckpt", 0], ["ckpt", 1], ["load", 0]),
        "out": _capture(["apply", 0], "model", kind="Model")})
    assert layer in message and "321" in message, message


# ---------------------------------------------------------------- the concept folder

def test_register_concept_folder_keeps_folders_from_extra_model_paths(pack, monkeypatch):
    import folder_paths
    common = sys.modules[pack.__name__ + ".nodes.common"]
    default = os.path.join(folder_paths.models_dir, "perfusion")
    # A copy of the registry, restored afterwards whatever the pack registers besides "perfusion"; the entry
    # as extra_model_paths.yaml leaves it (add_model_folder_path for a new name gives ([path], set())).
    monkeypatch.setattr(folder_paths, "folder_names_and_paths",
                        {**folder_paths.folder_names_and_paths, "perfusion": (["/some/extra"], set())})
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    common.register_concept_folder()
    paths, extensions = folder_paths.folder_names_and_paths["perfusion"]
    assert paths == ["/some/extra", default]
    assert extensions == {".safetensors"}
    common.register_concept_folder()  # idempotent
    assert folder_paths.folder_names_and_paths["perfusion"][0] == ["/some/extra", default]
    # With nothing registered yet, only the default folder.
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "perfusion")
    common.register_concept_folder()
    assert folder_paths.folder_names_and_paths["perfusion"] == ([default], {".safetensors"})
