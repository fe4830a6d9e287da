"""Reading and writing the concept file, format 1 (docs/method.md §6).

A concept file is an untrusted download. Its safetensors header is checked by hand before safetensors
sees it, nothing is ever unpickled, and every refusal is a ConceptFileError naming the file and the problem.
The writer runs the reader's checks on the bytes it is about to write, so it never writes a file we refuse.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import struct

import safetensors.torch
import torch

from .concept import ARCHITECTURES, Concept, is_valid_name, numeric_problem
from .files import write_atomically

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
MAX_FILE_BYTES = 32 << 20        # a real SDXL concept is ~350 KB
MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_ELEMENTS = 4 << 20
MAX_EMBEDDING_VECTORS = 75       # one CLIP chunk of 77 tokens, less start and end
MAX_NAME_CHARS = 100
MAX_LAYER_CHARS = 200            # a real layer path is ~45 characters; longer ones are refused (and cut in messages)
_ITEMSIZE = {"F32": 4, "F16": 2}
_LAYER = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_LAYOUT = ("a concept file holds embedding.<encoder>, i_star, u, i_super, value.<layer> and key.<layer>, "
           "where <layer> is a module path such as input_blocks.1.1.transformer_blocks.0.attn2")


class ConceptFileError(ValueError):
    """A concept file, or a concept about to be written, that this pack refuses."""


class _Invalid(Exception):
    """A problem found while checking; the public functions add which file it was."""


def _q(value) -> str:
    """repr() of an untrusted value, cut short so a hostile header cannot flood the message."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


# ---------------------------------------------------------------- public API

def read_concept(path) -> Concept:
    """Read and fully check a concept file; vectors come back as float32 CPU tensors."""
    path = os.fspath(path)
    try:
        concept = _decode(_read_bounded(path))
    except _Invalid as e:
        raise ConceptFileError(f"Cannot read Perfusion concept '{path}': {e}") from None
    log.debug("Read Perfusion concept %r (%s, %d layers) from %s", concept.name, concept.arch,
              len(concept.values), path)
    return concept


def write_concept(concept: Concept, path, dtype=torch.float32) -> None:
    """Check `concept` as read_concept would, then write it atomically as float32 or float16."""
    path = os.fspath(path)
    try:
        data = _checked_bytes(concept, dtype)
        write_atomically(path, data)
    except _Invalid as e:
        raise ConceptFileError(f"Refusing to write Perfusion concept '{path}': {e}") from None
    except OSError as e:
        raise ConceptFileError(f"Could not write Perfusion concept '{path}': {e}") from e
    log.info("Wrote Perfusion concept %r (%s, %d layers, %d bytes) to %s", concept.name, concept.arch,
             len(concept.values), len(data), path)


def concept_to_bytes(concept: Concept, dtype=torch.float32) -> bytes:
    """The checked file contents, as write_concept would write them."""
    try:
        return _checked_bytes(concept, dtype)
    except _Invalid as e:
        raise ConceptFileError(f"Refusing to serialize Perfusion concept: {e}") from None


def concept_from_bytes(data: bytes, source: str = "<bytes>") -> Concept:
    """read_concept for contents already in memory; `source` names them in errors."""
    try:
        return _decode(bytes(data))
    except _Invalid as e:
        raise ConceptFileError(f"Cannot read Perfusion concept '{source}': {e}") from None


# ---------------------------------------------------------------- reading

def _read_bounded(path: str) -> bytes:
    try:
        st = os.stat(path)
        # A FIFO or device would block or never end; only plain files are opened.
        if not stat.S_ISREG(st.st_mode):
            raise _Invalid("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise _Invalid(f"the file is too large ({st.st_size} bytes; a concept file is at most "
                           f"{MAX_FILE_BYTES >> 20} MiB, a real SDXL concept ~350 KB)")
        with open(path, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows meanwhile
    except FileNotFoundError:
        raise _Invalid("no such file") from None
    except OSError as e:
        raise _Invalid(f"the file cannot be read ({e.strerror or e})") from None


def _decode(data: bytes) -> Concept:
    fields = _parse_metadata(_parse_header(data))
    try:
        raw = safetensors.torch.load(data)
    except Exception as e:  # the header passed our checks; whatever safetensors still rejects is corrupt
        raise _Invalid(f"the tensor data is corrupt ({_q(str(e))})") from None
    return _build(raw, fields)


def _unique_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a key appears twice")  # json would silently keep the last one
    return obj


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_header(data: bytes) -> dict:
    """Check the safetensors header ourselves, so no malformed file reaches the safetensors parser.
    Returns the metadata."""
    if not data:
        raise _Invalid("the file is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise _Invalid(f"the file is too large (over {MAX_FILE_BYTES >> 20} MiB)")
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    # A safetensors header starts with "{"; only without one may the first bytes (which are the header's
    # length, and can be 0x80 or "PK" by chance) tell what else the file is.
    if not (2 <= n <= MAX_HEADER_BYTES and data[8:9] == b"{"):
        if data[:1] == b"\x80":
            raise _Invalid("not a safetensors file: it looks like a Python pickle (.pt/.ckpt); pickles are never loaded")
        if data[:2] == b"PK":
            raise _Invalid("not a safetensors file: it looks like a zip archive as torch.save writes "
                           "(.pt/.ckpt, a pickle inside); pickles are never loaded")
    if len(data) < 8:
        raise _Invalid(f"not a safetensors file, or truncated: only {len(data)} bytes")
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise _Invalid(f"not a safetensors file (header length {n} is implausible; is it a pickle/.ckpt/.pt?)")
    if 8 + n > len(data):
        raise _Invalid(f"truncated: the header needs {n} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Invalid(f"not a safetensors file (its header is not valid UTF-8 JSON: {_q(str(e))})") from None
    if not isinstance(header, dict):
        raise _Invalid("not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Invalid("__metadata__ must map strings to strings")
    data_len = len(data) - 8 - n
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _Invalid(f"tensor {_q(key)} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise _Invalid(f"tensor {_q(key)} has dtype {_q(dtype)}; only F32 and F16 are allowed")
        if not (isinstance(shape, list) and len(shape) <= 2 and all(map(_count, shape))):
            raise _Invalid(f"tensor {_q(key)} has shape {_q(shape)}; expected at most 2 non-negative sizes")
        numel = math.prod(shape)
        if numel > MAX_TENSOR_ELEMENTS:
            raise _Invalid(f"tensor {_q(key)} is too large ({numel} elements, at most {MAX_TENSOR_ELEMENTS})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))
                and offsets[0] <= offsets[1] and offsets[1] - offsets[0] == numel * _ITEMSIZE[dtype]):
            raise _Invalid(f"tensor {_q(key)} has data_offsets {_q(offsets)} that do not fit "
                           f"its shape {shape} of {dtype}")
        if offsets[1] > data_len:
            raise _Invalid(f"truncated: tensor {_q(key)} ends at byte {offsets[1]} of the data, "
                           f"but only {data_len} bytes are there")
    return metadata


def _parse_metadata(meta: dict) -> dict:
    """The metadata as Concept fields, each checked."""
    version = meta.get("perfusion.format")
    if version is None:
        raise _Invalid("not a Perfusion concept file (no perfusion.format in its metadata)")
    if version != FORMAT_VERSION:
        raise _Invalid(f"format version {_q(version)} is not supported; this pack reads format {FORMAT_VERSION}")
    arch = meta.get("perfusion.arch", "")
    if arch not in ARCHITECTURES:
        raise _Invalid(f"unknown architecture {_q(arch)} in perfusion.arch (known: {', '.join(ARCHITECTURES)})")
    name = meta.get("perfusion.name", "")
    if not name:
        raise _Invalid("the concept name (perfusion.name) is empty")
    if len(name) > MAX_NAME_CHARS:
        raise _Invalid(f"the concept name is {len(name)} characters long; at most {MAX_NAME_CHARS} are allowed")
    if any(c.isspace() for c in name):
        raise _Invalid(f"the concept name {_q(name)} contains whitespace; it must be one word, "
                       "as written in prompts (embedding:<name>)")
    if not is_valid_name(name):
        raise _Invalid(f"the concept name {_q(name)} may only use letters, digits, '_', '-' and '.' "
                       "(it is written embedding:<name> and used in file names)")
    superclass = meta.get("perfusion.superclass", "")
    if not superclass.strip():
        raise _Invalid("the superclass (perfusion.superclass) is empty")
    beta, tau = _float(meta, "perfusion.beta"), _float(meta, "perfusion.tau")
    if tau <= 0:
        raise _Invalid(f"perfusion.tau must be > 0, got {tau!r}")
    train = meta.get("perfusion.train", "{}")
    try:
        json.loads(train)
    except (ValueError, RecursionError):
        raise _Invalid("perfusion.train is not valid JSON") from None
    return dict(name=name, superclass=superclass, arch=arch, beta=beta, tau=tau,
                covariance=meta.get("perfusion.covariance", ""), train=train)


def _float(meta: dict, key: str) -> float:
    try:
        value = float(meta[key])
    except KeyError:
        raise _Invalid(f"{key} is missing") from None
    except ValueError:
        raise _Invalid(f"{key} is not a number: {_q(meta[key])}") from None
    if not math.isfinite(value):
        raise _Invalid(f"{key} must be finite, got {value!r}")
    return value


def _build(raw: dict[str, torch.Tensor], fields: dict) -> Concept:
    arch = ARCHITECTURES[fields["arch"]]
    d_ctx = arch["context_dim"]
    fixed = [f"embedding.{enc}" for enc in arch["embeddings"]] + ["i_star", "u", "i_super"]
    values, keys, unexpected = {}, {}, []
    for name in sorted(raw):
        kind, _, layer = name.partition(".")
        if kind in ("value", "key") and len(layer) <= MAX_LAYER_CHARS and _LAYER.fullmatch(layer):
            (values if kind == "value" else keys)[layer] = raw[name].to(torch.float32)
        elif name not in fixed:
            unexpected.append(name)
    if unexpected:
        raise _Invalid(f"unexpected tensors {', '.join(map(_q, unexpected[:10]))} ({fields['arch']}: {_LAYOUT})")
    missing = [k for k in fixed if k not in raw] + ([] if values else ["value.<layer> (at least one)"])
    if missing:
        raise _Invalid(f"missing tensors for {fields['arch']}: {', '.join(missing)}")
    orphans = sorted(set(keys) - set(values))
    if orphans:
        raise _Invalid(f"key.{orphans[0]} has no matching value.{orphans[0]}")
    for name, t in raw.items():
        if not torch.isfinite(t).all():
            raise _Invalid(f"tensor {name} contains NaN or Inf")

    def bad_shape(key, t, expected):
        return _Invalid(f"{key} has shape {list(t.shape)}, expected {expected}")

    embeddings = {}
    for enc, dim in arch["embeddings"].items():
        key, t = f"embedding.{enc}", raw[f"embedding.{enc}"].to(torch.float32)
        vecs = t.reshape(1, -1) if t.dim() == 1 else t  # a single vector may be stored 1-D
        if vecs.dim() != 2 or vecs.shape[1] != dim or not 1 <= vecs.shape[0] <= MAX_EMBEDDING_VECTORS:
            raise bad_shape(key, t, f"[n, {dim}] with 1 <= n <= {MAX_EMBEDDING_VECTORS}")
        embeddings[enc] = vecs
    if len({v.shape[0] for v in embeddings.values()}) > 1:
        raise _Invalid("the embeddings hold different numbers of vectors per text encoder "
                       f"({', '.join(f'{k}: {v.shape[0]}' for k, v in embeddings.items())})")
    vectors = {}
    for key in ("i_star", "u", "i_super"):
        t = raw[key].to(torch.float32)
        if tuple(t.shape) != (d_ctx,):
            raise bad_shape(key, t, f"[{d_ctx}] (d_ctx of {fields['arch']})")
        vectors[key] = t
    for layer, t in values.items():
        if t.dim() != 1 or t.shape[0] < 1:
            raise bad_shape(f"value.{layer}", t, "[d_out] (1-D, d_out >= 1)")
    for layer, t in keys.items():
        if t.shape != values[layer].shape:
            raise bad_shape(f"key.{layer}", t, f"{list(values[layer].shape)}, the shape of value.{layer}")
    # The gate divides by E = u·i*; without a positive finite E it is undefined.
    if not vectors["i_star"].any():
        raise _Invalid("i_star is all zeros, so the gate is undefined")
    # float64 for the sign; the bound is float32's because the gate runs in float32 or narrower
    energy = float(torch.dot(vectors["u"].double(), vectors["i_star"].double()))
    if not 0 < energy < torch.finfo(torch.float32).max:
        raise _Invalid(f"u·i_star (the energy E) is {energy:g}; it must be > 0 and finite in float32, else the gate is undefined")
    concept = Concept(embeddings=embeddings, values=values, keys=keys, **vectors, **fields)
    problem = numeric_problem(concept)  # magnitudes, a vanishing i*: the rules apply_concepts enforces too
    if problem:
        raise _Invalid(problem)
    return concept


# ---------------------------------------------------------------- writing

def _checked_bytes(concept: Concept, dtype) -> bytes:
    data = _encode(concept, dtype)
    _decode(data)  # the reader's own checks: a file we would refuse is never written
    return data


def _encode(concept: Concept, dtype) -> bytes:
    if dtype not in (torch.float32, torch.float16):
        raise _Invalid(f"dtype {dtype} is not supported; use torch.float32 or torch.float16")
    if not isinstance(concept, Concept):
        raise _Invalid(f"expected a Concept, got {type(concept).__name__}")
    tensors = {}

    def put(key, value):
        if not isinstance(value, torch.Tensor):
            raise _Invalid(f"{key} is a {type(value).__name__}, not a tensor")
        # clone: safetensors refuses tensors that share storage, as views of one buffer would
        t = value.detach().to(device="cpu", dtype=dtype).clone(memory_format=torch.contiguous_format)
        if dtype == torch.float16 and torch.isfinite(value).all() and not torch.isfinite(t).all():
            raise _Invalid(f"{key} has values beyond the float16 range (±65504); write it as float32")
        tensors[key] = t.reshape(1, -1) if key.startswith("embedding.") and t.dim() == 1 else t

    for enc, vecs in concept.embeddings.items():
        put(f"embedding.{enc}", vecs)
    for key in ("i_star", "u", "i_super"):
        put(key, getattr(concept, key))
    for layer, t in concept.values.items():
        put(f"value.{layer}", t)
    for layer, t in concept.keys.items():
        put(f"key.{layer}", t)
    for field in ("name", "superclass", "arch", "covariance", "train"):
        if not isinstance(getattr(concept, field), str):
            raise _Invalid(f"{field} must be a string, got {type(getattr(concept, field)).__name__}")
    try:
        beta, tau = float(concept.beta), float(concept.tau)
    except (TypeError, ValueError):
        raise _Invalid(f"beta and tau must be numbers, got {_q(concept.beta)} and {_q(concept.tau)}") from None
    metadata = {
        "perfusion.format": FORMAT_VERSION, "perfusion.name": concept.name,
        "perfusion.superclass": concept.superclass, "perfusion.arch": concept.arch,
        "perfusion.beta": repr(beta), "perfusion.tau": repr(tau),
        "perfusion.covariance": concept.covariance, "perfusion.train": concept.train,
    }
    return safetensors.torch.save(tensors, metadata)
