"""The concept file, format 1 (docs/method.md §6): round trips, every refusal, and the atomic write.

Pure torch + safetensors: no ComfyUI needed. Bad files are built here from the documented format,
independently of the writer, so the reader is tested against the contract rather than against itself.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from perfusion_ops.concept import ARCHITECTURES, Concept
from perfusion_ops.concept_file import (ConceptFileError, concept_from_bytes, concept_to_bytes,
                                        read_concept, write_concept)

REPO = Path(__file__).resolve().parents[1]


def _attn2(block: str, depth: int) -> list[str]:
    return [f"{block}.transformer_blocks.{j}.attn2" for j in range(depth)]


# The real cross-attention layers of ComfyUI's SD1.5 and SDXL UNets and their widths.
SD_LAYERS = {  # SD1.5 and SD2.x share the layout
    **{name: w for i, w in [(1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280)]
       for name in _attn2(f"input_blocks.{i}.1", 1)},
    **{name: 1280 for name in _attn2("middle_block.1", 1)},
    **{name: w for i, w in [(3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640),
                            (9, 320), (10, 320), (11, 320)]
       for name in _attn2(f"output_blocks.{i}.1", 1)},
}
SDXL_LAYERS = {
    **{name: w for i, w, d in [(4, 640, 2), (5, 640, 2), (7, 1280, 10), (8, 1280, 10)]
       for name in _attn2(f"input_blocks.{i}.1", d)},
    **{name: 1280 for name in _attn2("middle_block.1", 10)},
    **{name: w for i, w, d in [(0, 1280, 10), (1, 1280, 10), (2, 1280, 10), (3, 640, 2), (4, 640, 2), (5, 640, 2)]
       for name in _attn2(f"output_blocks.{i}.1", d)},
}
LAYERS = {"sd1": SD_LAYERS, "sd2": SD_LAYERS, "sdxl": SDXL_LAYERS}
SD1_LAYER = "input_blocks.1.1.transformer_blocks.0.attn2"


def test_layer_tables_match_the_architectures():
    assert len(SD_LAYERS) == 16 and len(SDXL_LAYERS) == 70


def make_concept(arch="sd1", n=1, with_keys=False, seed=0, layers=None, **changes) -> Concept:
    g = torch.Generator().manual_seed(seed)
    d_ctx = ARCHITECTURES[arch]["context_dim"]
    layers = LAYERS[arch] if layers is None else layers
    i_star = torch.randn(d_ctx, generator=g)
    # u = C^-1 i* for a positive diagonal C, so E = u·i* > 0 as in a real concept
    u = i_star / (1 + torch.rand(d_ctx, generator=g))
    fields = dict(
        name="sks_teddy", superclass="teddy", arch=arch,
        embeddings={enc: torch.randn(n, dim, generator=g) for enc, dim in ARCHITECTURES[arch]["embeddings"].items()},
        i_star=i_star, u=u, i_super=torch.randn(d_ctx, generator=g),
        values={layer: torch.randn(w, generator=g) for layer, w in layers.items()},
        keys={layer: torch.randn(w, generator=g) for layer, w in layers.items()} if with_keys else {},
        beta=0.7, tau=0.15, covariance="laion-1k:3f2a9c", train=json.dumps({"steps": 400, "lr": 0.01}),
    )
    fields.update(changes)
    return Concept(**fields)


def small_sd1(**changes) -> Concept:
    layers = {SD1_LAYER: 320, "middle_block.1.transformer_blocks.0.attn2": 1280,
              "output_blocks.8.1.transformer_blocks.0.attn2": 640}
    return make_concept("sd1", layers=layers, **changes)


def assert_same(a: Concept, b: Concept, rounding=lambda t: t):
    for f in ("name", "superclass", "arch", "beta", "tau", "covariance", "train"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.embeddings.keys() == b.embeddings.keys()
    assert a.values.keys() == b.values.keys() and a.keys.keys() == b.keys.keys()
    pairs = [(a.embeddings[k], b.embeddings[k]) for k in a.embeddings]
    pairs += [(getattr(a, k), getattr(b, k)) for k in ("i_star", "u", "i_super")]
    pairs += [(a.values[k], b.values[k]) for k in a.values] + [(a.keys[k], b.keys[k]) for k in a.keys]
    for x, y in pairs:
        assert y.dtype == torch.float32 and y.device.type == "cpu"
        assert torch.equal(rounding(x), y)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("with_keys", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip(tmp_path, arch, with_keys, dtype):
    concept = make_concept(arch, n=2, with_keys=with_keys)
    path = tmp_path / "concept.safetensors"
    write_concept(concept, path, dtype=dtype)
    back = read_concept(path)
    assert_same(concept, back, (lambda t: t.half().float()) if dtype == torch.float16 else (lambda t: t))
    assert back.layers == sorted(LAYERS[arch])


def test_file_follows_the_documented_layout(tmp_path):
    concept = make_concept("sdxl", with_keys=True)
    path = tmp_path / "c.safetensors"
    write_concept(concept, path)
    with safetensors.safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert f.get_tensor("embedding.clip_g").shape == (1, 1280)
        assert f.get_tensor("i_star").shape == (2048,)
    assert meta == {"perfusion.format": "1", "perfusion.name": "sks_teddy", "perfusion.superclass": "teddy",
                    "perfusion.arch": "sdxl", "perfusion.beta": "0.7", "perfusion.tau": "0.15",
                    "perfusion.covariance": "laion-1k:3f2a9c", "perfusion.train": concept.train}
    assert keys == ({"embedding.clip_l", "embedding.clip_g", "i_star", "u", "i_super"}
                    | {f"value.{k}" for k in SDXL_LAYERS} | {f"key.{k}" for k in SDXL_LAYERS})
    assert path.stat().st_size < 1_000_000  # "a real SDXL concept is ~350 KB" (twice that with keys)


def test_writer_takes_awkward_tensors(tmp_path):
    """Views of one buffer, non-contiguous, requiring grad, 1-D embedding: all written plainly."""
    base = torch.randn(2, 640, requires_grad=True)
    layers = {"output_blocks.6.1.transformer_blocks.0.attn2": 640, "output_blocks.7.1.transformer_blocks.0.attn2": 640}
    concept = make_concept("sd1", layers=layers)
    values = dict(zip(layers, [base[0], base[1]]))
    emb = torch.randn(768, 2)[:, 0]  # non-contiguous, 1-D
    concept = concept.replace(values=values, embeddings={"clip_l": emb})
    write_concept(concept, tmp_path / "c.safetensors")
    back = read_concept(tmp_path / "c.safetensors")
    assert torch.equal(back.embeddings["clip_l"], emb[None])
    assert all(torch.equal(back.values[k], v.detach()) for k, v in values.items())


def test_bytes_helpers_and_str_path(tmp_path):
    concept = small_sd1()
    assert_same(concept, concept_from_bytes(concept_to_bytes(concept)))
    write_concept(concept, str(tmp_path / "c.safetensors"))
    assert_same(concept, read_concept(str(tmp_path / "c.safetensors")))


def test_optional_metadata_defaults(tmp_path):
    tensors, meta = parts()
    del meta["perfusion.train"], meta["perfusion.covariance"]
    back = concept_from_bytes(safetensors.torch.save(tensors, meta))
    assert back.train == "{}" and back.covariance == ""


def test_one_dimensional_embedding_is_one_vector():
    tensors, meta = parts()
    tensors["embedding.clip_l"] = tensors["embedding.clip_l"][0].clone()
    back = concept_from_bytes(safetensors.torch.save(tensors, meta))
    assert back.embeddings["clip_l"].shape == (1, 768)


def test_module_does_not_import_comfyui():
    code = ("import sys, perfusion_ops.concept_file; "
            "sys.exit(any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules))")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


# ---------------------------------------------------------------- refusals

def parts(concept: Concept | None = None) -> tuple[dict, dict]:
    """The tensors and metadata of a valid file, built from docs/method.md §6 rather than by the writer."""
    c = concept or small_sd1()
    tensors = {f"embedding.{k}": v.clone() for k, v in c.embeddings.items()}
    tensors.update({k: getattr(c, k).clone() for k in ("i_star", "u", "i_super")})
    tensors.update({f"value.{k}": v.clone() for k, v in c.values.items()})
    tensors.update({f"key.{k}": v.clone() for k, v in c.keys.items()})
    meta = {"perfusion.format": "1", "perfusion.name": c.name, "perfusion.superclass": c.superclass,
            "perfusion.arch": c.arch, "perfusion.beta": repr(c.beta), "perfusion.tau": repr(c.tau),
            "perfusion.covariance": c.covariance, "perfusion.train": c.train}
    return tensors, meta


def refused(path, *needles) -> str:
    with pytest.raises(ConceptFileError) as info:
        read_concept(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _set(key, value):
    return lambda t, m: t.__setitem__(key, value)


def _meta(key, value):
    return lambda t, m: m.__setitem__(key, value) if value is not None else m.pop(key)


def _poison(key, index, value):
    return lambda t, m: t[key].view(-1).__setitem__(index, value)


BAD_CONTENT = {
    "missing_key": (lambda t, m: t.pop("u"), ["missing", "u"]),
    "missing_embedding": (lambda t, m: t.pop("embedding.clip_l"), ["missing", "embedding.clip_l"]),
    "no_values": (lambda t, m: [t.pop(k) for k in list(t) if k.startswith("value.")], ["missing", "value.<layer>"]),
    "extra_key": (_set("bogus", torch.zeros(3)), ["unexpected", "bogus"]),
    "foreign_embedding": (_set("embedding.clip_g", torch.zeros(1, 1280)), ["unexpected", "embedding.clip_g"]),
    "bad_layer_name": (_set("value.foo bar", torch.zeros(320)), ["unexpected", "value.foo bar"]),
    "key_without_value": (_set("key.foo.attn2", torch.zeros(320)), ["key.foo.attn2", "no matching value"]),
    "i_star_shape": (_set("i_star", torch.ones(767)), ["i_star", "[767]", "expected [768]"]),
    "embedding_dim": (_set("embedding.clip_l", torch.zeros(1, 700)), ["embedding.clip_l", "[1, 700]", "expected"]),
    "embedding_count": (_set("embedding.clip_l", torch.zeros(76, 768)), ["embedding.clip_l", "[76, 768]", "75"]),
    "embedding_empty": (_set("embedding.clip_l", torch.zeros(0, 768)), ["embedding.clip_l", "[0, 768]"]),
    "value_2d": (_set(f"value.{SD1_LAYER}", torch.zeros(2, 320)), [f"value.{SD1_LAYER}", "[2, 320]", "d_out"]),
    "value_empty": (_set(f"value.{SD1_LAYER}", torch.zeros(0)), [f"value.{SD1_LAYER}", "[0]", "d_out"]),
    "key_shape": (_set(f"key.{SD1_LAYER}", torch.zeros(640)), [f"key.{SD1_LAYER}", "[640]", "[320]"]),
    "nan_value": (_poison(f"value.{SD1_LAYER}", 5, float("nan")), [f"value.{SD1_LAYER}", "NaN"]),
    "inf_embedding": (_poison("embedding.clip_l", 0, float("inf")), ["embedding.clip_l", "Inf"]),
    "nan_u": (_poison("u", 0, float("nan")), ["tensor u ", "NaN"]),
    "i_star_zero": (_set("i_star", torch.zeros(768)), ["i_star", "all zeros", "gate"]),
    "energy_negative": (lambda t, m: t.__setitem__("u", -t["i_star"]), ["energy", "> 0", "gate"]),
    "energy_zero": (lambda t, m: t.__setitem__("u", torch.zeros(768)), ["energy", "> 0"]),
    "energy_overflow": (lambda t, m: t.__setitem__("u", t["i_star"].sign() * 3e38), ["energy", "finite"]),
    "value_huge": (lambda t, m: t[f"value.{SD1_LAYER}"].mul_(1e7), [f"value.{SD1_LAYER}", "entries up to", "1e+06"]),
    "embedding_huge": (_poison("embedding.clip_l", 3, 2e6), ["embedding.clip_l", "entries up to 2e+06"]),
    "i_super_huge": (_poison("i_super", 0, -1e30), ["i_super", "entries up to 1e+30"]),
    "i_star_vanishing": (lambda t, m: t["i_star"].mul_(1e-6), ["i_star has norm", "at least 0.001"]),
    "layer_name_too_long": (_set("value." + "a" * 201, torch.zeros(4)), ["unexpected", "value.aaaa"]),
    "no_metadata": (lambda t, m: m.clear(), ["not a Perfusion concept file"]),
    "no_format": (_meta("perfusion.format", None), ["not a Perfusion concept file"]),
    "format_2": (_meta("perfusion.format", "2"), ["format version '2' is not supported", "format 1"]),
    "unknown_arch": (_meta("perfusion.arch", "sd3"), ["unknown architecture", "sd3"]),
    "other_arch": (_meta("perfusion.arch", "sdxl"), ["missing", "embedding.clip_g"]),
    "empty_name": (_meta("perfusion.name", ""), ["name", "empty"]),
    "missing_name": (_meta("perfusion.name", None), ["name", "empty"]),
    "name_with_space": (_meta("perfusion.name", "my teddy"), ["whitespace"]),
    "name_with_newline": (_meta("perfusion.name", "teddy\n"), ["whitespace"]),
    "name_too_long": (_meta("perfusion.name", "x" * 101), ["101 characters"]),
    "empty_superclass": (_meta("perfusion.superclass", " "), ["superclass", "empty"]),
    "tau_zero": (_meta("perfusion.tau", "0.0"), ["perfusion.tau", "> 0"]),
    "tau_negative": (_meta("perfusion.tau", "-0.1"), ["perfusion.tau", "> 0"]),
    "tau_nan": (_meta("perfusion.tau", "nan"), ["perfusion.tau", "finite"]),
    "beta_inf": (_meta("perfusion.beta", "inf"), ["perfusion.beta", "finite"]),
    "beta_text": (_meta("perfusion.beta", "high"), ["perfusion.beta", "not a number"]),
    "beta_missing": (_meta("perfusion.beta", None), ["perfusion.beta", "missing"]),
    "train_not_json": (_meta("perfusion.train", "{steps: 400"), ["perfusion.train", "JSON"]),
    "f64": (lambda t, m: t.__setitem__("u", t["u"].double()), ["'u'", "F64", "only F32 and F16"]),
    "i32": (_set("extra", torch.zeros(3, dtype=torch.int32)), ["I32"]),
    "bf16": (lambda t, m: t.__setitem__("u", t["u"].bfloat16()), ["BF16"]),
    "three_dims": (_set("extra", torch.zeros(1, 1, 3)), ["extra", "at most 2"]),
    "too_many_elements": (_set("extra", torch.zeros(2049, 2049, dtype=torch.float16)), ["too large"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENT))
def test_bad_content_is_refused(tmp_path, case):
    mutate, needles = BAD_CONTENT[case]
    tensors, meta = parts(small_sd1(with_keys=True))
    mutate(tensors, meta)
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(safetensors.torch.save(tensors, meta))
    refused(path, *needles)


def test_sdxl_embeddings_must_agree_in_count(tmp_path):
    tensors, meta = parts(make_concept("sdxl", n=2))
    tensors["embedding.clip_g"] = tensors["embedding.clip_g"][:1].clone()
    path = tmp_path / "c.safetensors"
    path.write_bytes(safetensors.torch.save(tensors, meta))
    refused(path, "clip_l: 2", "clip_g: 1")


def raw_file(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file by hand: 8-byte length, header, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def valid_bytes() -> bytes:
    return safetensors.torch.save(*parts())


def _header_len() -> int:
    return struct.unpack("<Q", valid_bytes()[:8])[0]


U = {"dtype": "F32", "shape": [768], "data_offsets": [0, 3072]}
BAD_BYTES = {
    "random": (random.Random(0).randbytes(4096), ["not a safetensors file"]),
    "text": (b"hello, this is not a concept\n" * 10, ["not a safetensors file"]),
    "pickle": (pickle.dumps({"u": [1.0, 2.0]}), ["not a safetensors file", "pickle"]),
    "huge_header_length": (struct.pack("<Q", 2**63) + b"{}" * 10, ["not a safetensors file"]),
    "header_over_cap": (raw_file(b" " * 16, length=(1 << 20) + 1), ["not a safetensors file"]),
    "header_length_1": (raw_file(b"{", length=1), ["not a safetensors file"]),
    "header_not_utf8": (raw_file(b"\xff\xfe{}"), ["not a safetensors file", "UTF-8 JSON"]),
    "header_not_json": (raw_file(b"{'u': 1}"), ["not a safetensors file", "JSON"]),
    "header_list": (raw_file([1, 2]), ["not a JSON object"]),
    "header_deep": (raw_file(b"[" * 200_000), ["not a safetensors file"]),
    "header_duplicate": (raw_file(b'{"u": %s, "u": %s}' % (json.dumps(U).encode(), json.dumps(U).encode()),
                                  bytes(3072)), ["twice"]),
    "metadata_not_str": (raw_file({"__metadata__": {"perfusion.format": 1}}), ["__metadata__"]),
    "metadata_list": (raw_file({"__metadata__": ["x"]}), ["__metadata__"]),
    "entry_not_dict": (raw_file({"u": 3}), ["'u'", "malformed"]),
    "entry_incomplete": (raw_file({"u": {"dtype": "F32", "shape": [768]}}), ["'u'", "malformed"]),
    "dtype_not_str": (raw_file({"u": {**U, "dtype": ["F32"]}}), ["dtype", "only F32 and F16"]),
    "shape_negative": (raw_file({"u": {**U, "shape": [-768]}}), ["shape", "non-negative"]),
    "shape_float": (raw_file({"u": {**U, "shape": [768.0]}}), ["shape"]),
    "shape_bool": (raw_file({"u": {**U, "shape": [True]}}), ["shape"]),
    "shape_huge": (raw_file({"u": {**U, "shape": [2**62, 2**62]}}), ["too large"]),
    "offsets_reversed": (raw_file({"u": {**U, "data_offsets": [3072, 0]}}, bytes(3072)), ["data_offsets"]),
    "offsets_wrong_span": (raw_file({"u": {**U, "data_offsets": [0, 3000]}}, bytes(3072)), ["data_offsets"]),
    "offsets_past_end": (raw_file({"u": U}, bytes(100)), ["truncated"]),
    "overlapping_tensors": (raw_file({"__metadata__": parts()[1], "u": U, "i_star": U}, bytes(3072)), ["corrupt"]),
    "trailing_garbage": (valid_bytes() + b"garbage!", ["corrupt"]),
    "too_short": (b"\x10\x00\x00", ["not a safetensors file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_BYTES))
def test_bad_bytes_are_refused(tmp_path, case):
    data, needles = BAD_BYTES[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    refused(path, *needles)


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_save_pickle_is_refused_without_loading(tmp_path, legacy):
    path = tmp_path / "concept.pt"
    torch.save({"i_star": torch.ones(768), "u": torch.ones(768)}, path, _use_new_zipfile_serialization=not legacy)
    refused(path, "not a safetensors file", "pickle", "never loaded")


def test_truncated_file_is_refused(tmp_path):
    data = valid_bytes()
    n = _header_len()
    for cut in sorted({1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, 8 + n + 1000, len(data) - 1}):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        refused(path, "truncated")


def test_empty_missing_and_odd_paths(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    refused(tmp_path / "empty.safetensors", "empty")
    refused(tmp_path / "missing.safetensors", "no such file")
    refused(tmp_path, "not a regular file")
    if hasattr(os, "mkfifo"):  # opening a FIFO would block forever
        os.mkfifo(tmp_path / "fifo.safetensors")
        refused(tmp_path / "fifo.safetensors", "not a regular file")


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(valid_bytes())
        f.truncate(33 << 20)  # sparse: costs no disk
    refused(path, "too large", "32 MiB")


def test_refusal_is_a_value_error():
    assert issubclass(ConceptFileError, ValueError)


def test_header_length_that_looks_like_a_pickle_or_zip_magic_is_still_read():
    """The first bytes of a safetensors file are its header length: 0x80 (pickle's magic) whenever the length is
    128 mod 256, "PK" (zip's) when it is 19280 mod 65536. Such files are valid (found by tests/test_reader_fuzz.py:
    the writer refused one concept in 32 until the sniffing looked at the header first)."""
    lengths = set()
    for k in range(0, 256, 4):  # the writer pads headers to 8 bytes; these cover every length mod 256
        concept = small_sd1(train=json.dumps({"note": "x" * k}))
        data = concept_to_bytes(concept)
        lengths.add(struct.unpack("<Q", data[:8])[0] % 256)
        assert_same(concept, concept_from_bytes(data))
    assert 128 in lengths  # that file began with the byte 0x80
    (n,) = struct.unpack("<Q", data[:8])
    for length in (128, 19280):  # header padded with spaces, as the format allows
        if length > n:
            padded = struct.pack("<Q", length) + data[8:8 + n] + b" " * (length - n) + data[8 + n:]
            assert padded[:1] == b"\x80" or padded[:2] == b"PK"
            assert_same(concept, concept_from_bytes(padded))


# Property-based tests of the reader (random cuts, byte flips, garbled headers, hostile contents, huge claims,
# layers the model lacks), with time and memory bounds: tests/test_reader_fuzz.py.


# ---------------------------------------------------------------- writing

def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class Boom(OSError):
    pass


@pytest.mark.parametrize("step", ["replace", "fsync"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, step):
    def fail(*args, **kwargs):
        raise Boom("disk on fire")
    monkeypatch.setattr(os, step, fail)
    with pytest.raises(ConceptFileError, match="Could not write.*disk on fire"):
        write_concept(small_sd1(), tmp_path / "c.safetensors")
    assert leftovers(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    old = small_sd1(seed=1)
    write_concept(old, path)
    before = path.read_bytes()
    real_replace = os.replace

    def replace_after_checking(src, dst):
        assert Path(src).name.startswith(".c.safetensors") and src.endswith(".partial")
        assert Path(src).read_bytes() != before  # the new file was fully written beside the old one
        raise Boom("disk on fire")
    monkeypatch.setattr(os, "replace", replace_after_checking)
    with pytest.raises(ConceptFileError):
        write_concept(small_sd1(seed=2), path)
    assert path.read_bytes() == before and leftovers(tmp_path) == ["c.safetensors"]
    monkeypatch.setattr(os, "replace", real_replace)
    write_concept(small_sd1(seed=2), path)  # and a later write replaces it
    assert_same(small_sd1(seed=2), read_concept(path))


def test_interrupted_write_cleans_up_and_propagates(tmp_path, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_concept(small_sd1(), tmp_path / "c.safetensors")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("case, changes, needle", [
    ("nan_value", lambda c: dict(values={**c.values, SD1_LAYER: torch.full((320,), float("nan"))}), "NaN"),
    ("wrong_width", lambda c: dict(i_star=torch.ones(1024), u=torch.ones(1024)), "expected [768]"),
    ("bad_layer", lambda c: dict(values={"foo bar": torch.ones(4)}), "unexpected"),
    ("orphan_key", lambda c: dict(keys={"foo.attn2": torch.ones(4)}), "no matching value"),
    ("name_space", lambda c: dict(name="my teddy"), "whitespace"),
    ("arch", lambda c: dict(arch="sd3"), "unknown architecture"),
    ("tau", lambda c: dict(tau=0.0), "perfusion.tau"),
    ("beta_nan", lambda c: dict(beta=float("nan")), "finite"),
    ("energy", lambda c: dict(u=-c.i_star), "energy"),
    ("not_tensor", lambda c: dict(u=[1.0] * 768), "not a tensor"),
    ("train_dict", lambda c: dict(train={"steps": 1}), "train must be a string"),
    ("no_values", lambda c: dict(values={}), "value.<layer>"),
])
def test_invalid_concept_is_never_written(tmp_path, case, changes, needle):
    path = tmp_path / "c.safetensors"
    write_concept(small_sd1(seed=1), path)
    before = path.read_bytes()
    concept = small_sd1()
    with pytest.raises(ConceptFileError) as info:
        write_concept(concept.replace(**changes(concept)), path)
    assert "Refusing to write" in str(info.value) and str(path) in str(info.value)
    assert needle in str(info.value)
    assert path.read_bytes() == before and leftovers(tmp_path) == ["c.safetensors"]
    with pytest.raises(ConceptFileError):
        write_concept(concept.replace(**changes(concept)), tmp_path / "new.safetensors")
    assert leftovers(tmp_path) == ["c.safetensors"]


def test_float16_overflow_is_refused(tmp_path):
    concept = small_sd1()
    concept = concept.replace(values={**concept.values, SD1_LAYER: torch.full((320,), 1e5)})
    with pytest.raises(ConceptFileError, match="float16"):
        write_concept(concept, tmp_path / "c.safetensors", dtype=torch.float16)
    write_concept(concept, tmp_path / "c.safetensors")  # fine in float32
    assert leftovers(tmp_path) == ["c.safetensors"]


def test_unsupported_dtype_and_missing_directory(tmp_path):
    with pytest.raises(ConceptFileError, match="bfloat16"):
        write_concept(small_sd1(), tmp_path / "c.safetensors", dtype=torch.bfloat16)
    with pytest.raises(ConceptFileError, match="Could not write"):
        write_concept(small_sd1(), tmp_path / "no" / "such" / "dir" / "c.safetensors")
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_file_is_readable_by_others(tmp_path):
    path = tmp_path / "c.safetensors"
    write_concept(small_sd1(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o600)
    write_concept(small_sd1(seed=3), path)  # replacing keeps the mode the user chose
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
