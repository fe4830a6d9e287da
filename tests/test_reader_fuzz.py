"""Property-based tests of the concept reader (issue 7): no file can crash, hang or exhaust the host.

Every generated file must give either a valid concept or a ConceptFileError with a short, printable message
naming the file, within PER_CASE_LINES Python lines executed (a deterministic bound that catches hangs and runaway
loops, where a wall-clock bound would depend on the machine's load), and the reader must
never ask for memory its input does not hold: safetensors is only handed files whose header claims no more
bytes than the file has, and the Python heap's peak (tracemalloc) stays within a small multiple of the input.

- test_mutated_files: byte flips, overwrites, cuts, insertions, deletions, length-field edits of valid files.
- test_garbled_headers: header entries with wrong types, negative/oversized/odd shapes, foreign dtypes, offsets
  that do not fit; huge or ill-typed metadata; non-JSON or non-object headers; a length field larger than the
  file; truncated or padded data.
- test_hostile_contents: well-formed files whose tensors (dtypes, shapes, NaN/Inf, huge or tiny values, u against
  i*), tensor names or metadata values are wrong for a concept.
- test_huge_claims_are_refused_before_allocation: headers claiming up to 2^64-element tensors in a tiny file.
- test_arbitrary_bytes: anything at all.
- test_layers_the_model_does_not_have (needs the host): files that read fine but whose layers or widths do not
  match a tiny SD1 model are refused by apply_concepts (check_concept_fits), and matching ones work.

Each test counts the cases it ran; the counts are asserted and written to the test output at the end, with the
kinds of refusal seen (all of them in the WARNING log).
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import re
import struct
import sys
import tracemalloc

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from perfusion_ops.concept import ARCHITECTURES, Concept, is_valid_name, numeric_problem
from perfusion_ops.concept_file import (MAX_HEADER_BYTES, MAX_TENSOR_ELEMENTS, ConceptFileError, concept_from_bytes,
                                        concept_to_bytes)

log = logging.getLogger(__name__)

SOURCE = "fuzz.safetensors"
PER_CASE_LINES = 100_000         # Python lines one read (or one apply_concepts) may execute (the most seen: 10-20k)
HEAP_SLACK_BYTES = 4 << 20       # Python heap peak allowed beyond 4x the input's size
CASES: collections.Counter = collections.Counter()
REASONS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # test -> refusal kinds
FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


# ---------------------------------------------------------------- valid files to start from

def small_concept(arch="sd1", seed=0, with_keys=True, n=1) -> Concept:
    """A valid concept with two narrow layers: real vector widths for the architecture, a small file."""
    g = torch.Generator().manual_seed(seed)
    d = ARCHITECTURES[arch]["context_dim"]
    i_star = torch.randn(d, generator=g)
    layers = {"input_blocks.1.1.transformer_blocks.0.attn2": 8, "middle_block.1.transformer_blocks.0.attn2": 4}
    values = {k: torch.randn(w, generator=g) for k, w in layers.items()}
    return Concept(name="sks_teddy", superclass="teddy", arch=arch,
                   embeddings={e: torch.randn(n, w, generator=g) for e, w in ARCHITECTURES[arch]["embeddings"].items()},
                   i_star=i_star, u=i_star / (1 + torch.rand(d, generator=g)), i_super=torch.randn(d, generator=g),
                   values=values, keys={k: v.flip(0) for k, v in values.items()} if with_keys else {},
                   covariance="fuzz", train=json.dumps({"steps": 1}))


BASES = [concept_to_bytes(small_concept("sd1")),
         concept_to_bytes(small_concept("sd1", seed=1, with_keys=False, n=3), dtype=torch.float16),
         concept_to_bytes(small_concept("sdxl", seed=2))]


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


# ---------------------------------------------------------------- the property every case must have

def claimed_bytes(data: bytes) -> int:
    """What a safetensors header asks to be materialised, in bytes (for headers that parse)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return sum(math.prod(e["shape"]) * ITEMSIZE.get(e["dtype"], 8) for k, e in header.items() if k != "__metadata__")


@contextlib.contextmanager
def guarded_safetensors():
    """safetensors is only ever handed data that physically holds every tensor its header claims."""
    real_load = safetensors.torch.load

    def load(data):
        claimed, available = claimed_bytes(data), len(data) - 8 - struct.unpack("<Q", data[:8])[0]
        assert claimed <= available, f"safetensors asked to materialise {claimed} bytes from {available}"
        return real_load(data)
    safetensors.torch.load = load
    try:
        yield
    finally:
        safetensors.torch.load = real_load


class BudgetExceeded(BaseException):
    """Raised inside the code under test; a BaseException, so no `except Exception` of the reader can swallow it."""


class LineBudget:
    """Counts the Python lines executed in the block (sys.settrace) and stops it past `budget`: a hang or a loop
    over a size the input claims, caught the same way on any machine. (Time spent inside C/Rust code, e.g.
    safetensors, is bounded by the reader's size checks and the heap bound instead.)"""

    def __init__(self, budget: int = PER_CASE_LINES):
        self.budget, self.lines = budget, 0

    def _count(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines > self.budget:
                raise BudgetExceeded(f"more than {self.budget} Python lines")
        return self._count

    def __enter__(self):
        self._previous = sys.gettrace()
        sys.settrace(lambda frame, event, arg: self._count)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._previous)
        return False


def reason(message: str) -> str:
    """The kind of a refusal: its words, without names, quoted values and numbers."""
    message = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|[-+]?\d[\w.+-]*|\b(value|key|embedding)\.\S+", "#", message)
    return " ".join(message.split()[:8])


def check_case(test: str, blob: bytes, heap: bool = False) -> Concept | None:
    """Read `blob`: a valid concept or a clear ConceptFileError, in time and in bounded memory. Counted."""
    if heap:
        tracemalloc.reset_peak()
        heap_before = tracemalloc.get_traced_memory()[0]
    concept = None
    try:
        with LineBudget():
            concept = concept_from_bytes(blob, SOURCE)
    except ConceptFileError as error:
        message = str(error)
        prefix = f"Cannot read Perfusion concept '{SOURCE}': "
        assert message.startswith(prefix), message
        assert len(message) < 1000 and message.isprintable() and "Traceback" not in message, message
        REASONS[test][reason(message[len(prefix):])] += 1
    if heap:
        peak = tracemalloc.get_traced_memory()[1] - heap_before
        assert peak < 4 * len(blob) + HEAP_SLACK_BYTES, f"{peak} bytes of heap for a {len(blob)}-byte file"
    if concept is not None:  # accepted: then it is a concept the rest of the pack can use as it is
        assert is_valid_name(concept.name) and concept.arch in ARCHITECTURES
        assert math.isfinite(concept.beta) and math.isfinite(concept.tau) and concept.tau > 0
        assert numeric_problem(concept) is None
        for t in [*concept.embeddings.values(), concept.i_star, concept.u, concept.i_super,
                  *concept.values.values(), *concept.keys.values()]:
            assert t.dtype == torch.float32 and t.device.type == "cpu"
    CASES[test, "accepted" if concept is not None else "refused"] += 1
    return concept


def run_counted(test: str, minimum: int, inner) -> None:
    """Run a @given test body and check that at least `minimum` cases ran."""
    count = lambda: CASES[test, "accepted"] + CASES[test, "refused"]  # noqa: E731
    before = count()
    with guarded_safetensors():
        inner()
    ran = count() - before
    log.warning("reader fuzz %s: %d cases (%d accepted, %d refused)", test, ran, CASES[test, "accepted"],
                CASES[test, "refused"])
    assert ran >= minimum, f"{test}: only {ran} cases ran"


@pytest.fixture(scope="module", autouse=True)
def report_case_counts(request):
    """Write the case counts into the test output (a line per test, after this module's tests)."""
    yield
    if not CASES:
        return
    total = sum(n for (_, outcome), n in CASES.items() if outcome in ("accepted", "refused"))
    lines = [f"reader fuzz: {total} cases in all"]
    for test in sorted({t for t, _ in CASES}):
        extra = "".join(f", {n} {outcome}" for (t, outcome), n in sorted(CASES.items())
                        if t == test and outcome not in ("accepted", "refused"))
        lines.append(f"  {test}: {CASES[test, 'accepted'] + CASES[test, 'refused']} cases "
                     f"({CASES[test, 'accepted']} read as valid concepts, {CASES[test, 'refused']} refused clearly{extra})")
    for test, reasons in sorted(REASONS.items()):
        lines.append(f"  {test}: {len(reasons)} kinds of refusal; most common: "
                     + "; ".join(f"{r} ({n})" for r, n in reasons.most_common(3)))
    log.warning("\n".join(lines))
    for test, reasons in sorted(REASONS.items()):
        log.warning("reader fuzz %s, every kind of refusal:\n%s", test,
                    "\n".join(f"  {n:5d}  {r}" for r, n in reasons.most_common()))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            for line in lines:
                reporter.write_line(line)


# ---------------------------------------------------------------- byte-level mutations of valid files

def _mutation(blob_length: int, header_end: int):
    header, data = st.integers(8, header_end - 1), st.integers(header_end, blob_length - 1)
    position = st.one_of(st.integers(0, 7), header, header, data, data)  # mostly past the length field
    return st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("set"), position, st.integers(0, 255)),
        st.tuples(st.just("cut"), st.integers(0, blob_length)),
        st.tuples(st.just("delete"), position, st.integers(1, 64)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("length"), st.one_of(st.integers(0, 2**64 - 1), st.integers(-64, 64))),
        st.tuples(st.just("float"), data, st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -3e38, 1e7, 1e-40,
                                                            0.0, -0.0])),
    )


def _mutate(blob: bytes, op) -> bytes:
    b = bytearray(blob)
    kind = op[0]
    if not b:
        return bytes(b)
    if kind == "flip":
        b[op[1] % len(b)] ^= 1 << op[2]
    elif kind == "set":
        b[op[1] % len(b)] = op[2]
    elif kind == "cut":
        del b[op[1]:]
    elif kind == "delete":
        del b[op[1]:op[1] + op[2]]
    elif kind == "insert":
        b[op[1]:op[1]] = op[2]
    elif kind == "float":  # a hostile float32 over the data (two float16 halves in a float16 file)
        at = op[1] - op[1] % 2
        b[at:at + 4] = struct.pack("<f", op[2])[:len(b) - at]
    elif kind == "length":  # an absolute value, or the right one shifted
        value = op[1] if op[1] >= 64 or len(b) < 8 else struct.unpack("<Q", bytes(b[:8]))[0] + op[1]
        b[:8] = struct.pack("<Q", value % 2**64)
    return bytes(b)


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def _mutated_files(data):
    blob = data.draw(st.sampled_from(BASES))
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    for op in data.draw(st.lists(_mutation(len(blob), header_end), min_size=1, max_size=4)):
        blob = _mutate(blob, op)
    check_case("mutated_files", blob)


def test_mutated_files():
    run_counted("mutated_files", 300, _mutated_files)


# ---------------------------------------------------------------- garbled headers

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3), max_leaves=8)
BIG = st.sampled_from([MAX_TENSOR_ELEMENTS, MAX_TENSOR_ELEMENTS + 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
                       2**64 - 1, 2**64, 2**64 + 1, 10**12, 10**30, -1, -768, -2**63])
SIZE = st.one_of(st.integers(0, 4096), BIG, st.integers(-2**65, 2**65))
SHAPE = st.one_of(st.lists(SIZE, max_size=4), st.lists(SCALARS, max_size=3), ANY_JSON)
DTYPE = st.one_of(st.sampled_from(sorted(ITEMSIZE) + ["f32", "float32", "F32 ", "", "F 32", "\u0046\u0033\u0032"]),
                  SCALARS)
OFFSETS = st.one_of(st.lists(SIZE, max_size=3), st.tuples(SIZE, SIZE).map(list), ANY_JSON)
META_KEYS = st.one_of(st.sampled_from(["perfusion.format", "perfusion.name", "perfusion.superclass", "perfusion.arch",
                                       "perfusion.beta", "perfusion.tau", "perfusion.covariance", "perfusion.train"]),
                      st.text(max_size=20))
HUGE_TEXT = st.tuples(st.sampled_from([1 << 10, 1 << 16, (1 << 20) - 300, (1 << 20) + 1]),
                      st.sampled_from(["x", " ", "[", "{\"a\":", "é", "\x01"])).map(lambda t: t[1] * (t[0] // len(t[1])))
META_VALUES = st.one_of(st.text(max_size=40), HUGE_TEXT, ANY_JSON,
                        st.sampled_from(["1", "2", "sd1", "sdxl", "nan", "inf", "-inf", "1e400", "-0", "0", "1e-400",
                                         "٠٫٧", "0x10", "1_0", "{}", "[]", "[" * 10000, "null"]))
LAYER = st.from_regex(r"[a-z_]{1,12}(\.[0-9a-z_]{1,8}){0,6}", fullmatch=True)
TENSOR_NAMES = st.one_of(st.sampled_from(["i_star", "u", "i_super", "embedding.clip_l", "embedding.clip_g",
                                          "embedding.clip_h", "__metadata__", ""]),
                         st.builds(lambda kind, layer: f"{kind}.{layer}", st.sampled_from(["value", "key"]), LAYER),
                         st.text(max_size=30))


def _respec(entry: dict, dtype: str, shape: list, start: int) -> dict:
    """A header entry that is consistent in itself: offsets fit the shape and dtype."""
    size = math.prod(shape) * ITEMSIZE.get(dtype, 4)
    return {**entry, "dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}


@st.composite
def garbled_file(draw) -> bytes:
    blob = draw(st.sampled_from(BASES))
    header, data = split(blob)
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["field", "field", "respec", "respec", "drop_field", "drop_entry", "add_entry",
                                   "add_entry", "swap_offsets", "meta_set", "meta_set", "meta_set", "meta_drop",
                                   "meta_many", "meta_whole", "top_level"]))
        if not isinstance(header, dict):
            break
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if not isinstance(entry, dict) and op in ("field", "respec", "drop_field", "swap_offsets"):
            continue
        if op == "field":
            field, strategy = draw(st.sampled_from([("dtype", DTYPE), ("shape", SHAPE), ("data_offsets", OFFSETS)]))
            entry[field] = draw(strategy)
        elif op == "respec":  # consistent entry: passes the header checks, tests what lies beyond them
            shape = draw(st.one_of(st.lists(st.integers(0, 64), max_size=3), st.lists(SIZE, min_size=1, max_size=2)))
            start = entry["data_offsets"][0] if isinstance(entry.get("data_offsets"), list) and entry["data_offsets"] else 0
            header[name] = _respec(entry, draw(st.sampled_from(["F32", "F16", "F64", "I32", "U8", "BF16"])), shape,
                                   start if isinstance(start, int) else 0)
        elif op == "drop_field":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "drop_entry":
            header.pop(name, None)
        elif op == "add_entry":
            spec = draw(st.one_of(
                st.builds(lambda d, s, o: {"dtype": d, "shape": s, "data_offsets": o}, DTYPE, SHAPE, OFFSETS),
                st.builds(lambda s, a: _respec({}, "F32", s, a), st.lists(st.integers(0, 1024), max_size=2),
                          st.integers(0, len(data))),
                ANY_JSON))
            header[draw(TENSOR_NAMES)] = spec
        elif op == "swap_offsets":  # point a tensor at another's bytes
            other = header.get(draw(st.sampled_from(names)))
            if isinstance(other, dict):
                entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
        elif op.startswith("meta") and not isinstance(header.get("__metadata__"), dict):
            continue
        elif op == "meta_set":
            header["__metadata__"][draw(META_KEYS)] = draw(META_VALUES)
        elif op == "meta_drop":
            header["__metadata__"].pop(draw(META_KEYS), None)
        elif op == "meta_many":  # huge metadata: many keys
            count, width = draw(st.sampled_from([(100, 10), (10_000, 50), (25_000, 40)]))
            header["__metadata__"].update({f"junk.{i}": "v" * width for i in range(count)})
        elif op == "meta_whole":
            header["__metadata__"] = draw(ANY_JSON)
        elif op == "top_level":
            header = draw(ANY_JSON)
    text = json.dumps(header, allow_nan=True).encode()
    form = draw(st.sampled_from(["plain"] * 6 + ["padded", "nul_padded", "bom", "cut_json", "bad_utf8", "random",
                                                 "long_number"]))
    if form == "padded":  # trailing spaces: allowed by the safetensors format
        text += b" " * draw(st.integers(1, 64))
    elif form == "nul_padded":
        text += b"\x00" * draw(st.integers(1, 8))
    elif form == "bom":
        text = "\ufeff".encode() + text
    elif form == "cut_json":
        text = text[:draw(st.integers(0, max(0, len(text) - 1)))]
    elif form == "bad_utf8":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])) + text[at:]
    elif form == "random":
        text = draw(st.binary(max_size=256))
    elif form == "long_number":
        text = b'{"u": {"dtype": "F32", "shape": [' + b"9" * draw(st.sampled_from([20, 5000, 100_000])) + b'], ' \
               b'"data_offsets": [0, 4]}}'
    length = draw(st.one_of(*[st.just(None)] * 4, st.integers(0, 2**64 - 1),
                            st.integers(-16, 16).map(lambda k: max(0, len(text) + k)),
                            st.integers(0, 1 << 22).map(lambda k: len(text) + len(data) + k)))  # beyond the file
    tail = draw(st.sampled_from(["same"] * 4 + ["cut", "extra"]))
    if tail == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif tail == "extra":
        data = data + draw(st.binary(min_size=1, max_size=32))
    return join(text, data, length)


@settings(FUZZ, max_examples=400)
@given(blob=garbled_file())
def _garbled_headers(blob):
    check_case("garbled_headers", blob)


def test_garbled_headers():
    run_counted("garbled_headers", 300, _garbled_headers)


# ---------------------------------------------------------------- well-formed files with hostile contents

def parts(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header, _ = split(blob)
    return {k: v.clone() for k, v in safetensors.torch.load(blob).items()}, header["__metadata__"]


DTYPES = [torch.float64, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool,
          torch.float16, torch.float32]
FILLS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
SCALES = [1e30, 1e7, 1e-30, 1e-45, 0.0, -1.0, 1e3]
SHAPES = st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 75, 76, 320, 767, 768, 769, 1024, 1280, 2048]),
                  max_size=3).filter(lambda shape: math.prod(shape) <= 1 << 17)  # the generator's own memory


@st.composite
def hostile_contents(draw) -> bytes:
    """A well-formed safetensors file (the header checks pass) whose tensors and metadata are wrong for a
    concept: dtypes, shapes, values, names, metadata values."""
    tensors, meta = parts(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["meta_set", "meta_set", "meta_drop", "dtype", "shape", "fill", "scale", "scale",
                                   "drop", "add", "energy"]))
        name = draw(st.sampled_from(sorted(tensors))) if tensors else None
        if op == "meta_set":
            meta[draw(META_KEYS)] = draw(st.one_of(st.text(max_size=40), HUGE_TEXT.filter(lambda t: len(t) < 1 << 19),
                                                   META_VALUES.filter(lambda v: isinstance(v, str))))
        elif op == "meta_drop":
            meta.pop(draw(META_KEYS), None)
        elif name is None:
            continue
        elif op == "dtype":
            tensors[name] = tensors[name].to(draw(st.sampled_from(DTYPES)))
        elif op == "shape":
            tensors[name] = torch.randn(draw(SHAPES))
        elif op == "fill":
            t = tensors[name].float().clone()
            if t.numel():
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = FILLS[draw(st.sampled_from(sorted(FILLS)))]
            tensors[name] = t
        elif op == "scale":
            tensors[name] = tensors[name].float() * draw(st.sampled_from(SCALES))
        elif op == "drop":
            del tensors[name]
        elif op == "add":
            tensors[draw(TENSOR_NAMES.filter(lambda n: n and n != "__metadata__"))] = torch.randn(draw(SHAPES))
        elif op == "energy" and {"u", "i_star"} <= tensors.keys() and tensors["u"].shape == tensors["i_star"].shape:
            i = tensors["i_star"].float()  # u against i*: opposite, orthogonal, or nearly so
            tensors["u"] = draw(st.sampled_from([-i, torch.zeros_like(i), i.roll(1) - (i.roll(1) @ i) / (i @ i) * i,
                                                 i * 1e-20]))
    try:
        return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, meta)
    except Exception:  # what safetensors itself cannot write (e.g. an empty name) is no test of the reader
        assume(False)


@settings(FUZZ, max_examples=300)
@given(blob=hostile_contents())
def _hostile_contents(blob):
    check_case("hostile_contents", blob)


def test_hostile_contents():
    run_counted("hostile_contents", 250, _hostile_contents)


# ---------------------------------------------------------------- huge claims, with the heap watched

HUGE_SHAPES = [[10**12], [10**6, 10**6], [2**32, 2**32], [2**63], [2**64 - 1], [2**64], [2**70], [10**30],
               [MAX_TENSOR_ELEMENTS + 1], [2048, 2049], [0, 2**64], [2**64, 0]]


@settings(FUZZ, max_examples=80)
@given(name=st.sampled_from(["u", "i_star", "embedding.clip_l", "value.input_blocks.1.1.transformer_blocks.0.attn2",
                             "extra"]),
       shape=st.one_of(st.sampled_from(HUGE_SHAPES), st.lists(st.sampled_from([10**4, 10**6, 2**32, 2**40]),
                                                              min_size=1, max_size=2)),
       dtype=st.sampled_from(["F32", "F16", "F64", "U8"]),
       consistent=st.booleans(), base=st.sampled_from(BASES), in_metadata=st.booleans())
def _huge_claims(name, shape, dtype, consistent, base, in_metadata):
    header, data = split(base)
    if in_metadata:  # a huge length claimed for the header itself
        blob = join(json.dumps(header).encode(), data, length=math.prod(shape) % 2**64)
    else:
        numel = math.prod(shape)
        end = numel * ITEMSIZE[dtype] if consistent else len(data)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [0, end]}
        blob = join(json.dumps(header).encode(), data)
    assert check_case("huge_claims", blob, heap=True) is None


def test_huge_claims_are_refused_before_allocation():
    tracemalloc.start()
    try:
        run_counted("huge_claims", 60, _huge_claims)
    finally:
        tracemalloc.stop()
    # And the explicit cases, with the refusal they get.
    header, data = split(BASES[0])
    for shape, needle in [([10**12], "too large"), ([10**6, 10**6], "too large"), ([2**64], "too large"),
                          ([-(10**12)], "non-negative"), ([1, 1, 10**12], "at most 2")]:
        bad = {**header, "u": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * abs(math.prod(shape))]}}
        with pytest.raises(ConceptFileError, match=needle):
            concept_from_bytes(join(json.dumps(bad).encode(), data), SOURCE)
    with pytest.raises(ConceptFileError, match="truncated"):  # header length beyond the file, within the cap
        concept_from_bytes(join(json.dumps(header).encode(), data, length=MAX_HEADER_BYTES), SOURCE)


# ---------------------------------------------------------------- anything at all

@settings(FUZZ, max_examples=200)
@given(blob=st.one_of(st.binary(max_size=512),
                      st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1),
                                st.binary(max_size=256)),
                      st.builds(lambda j, rest: join(json.dumps(j).encode(), rest), ANY_JSON, st.binary(max_size=64))))
def _arbitrary_bytes(blob):
    check_case("arbitrary_bytes", blob)


def test_arbitrary_bytes():
    run_counted("arbitrary_bytes", 150, _arbitrary_bytes)


# ---------------------------------------------------------------- layers the model does not have

@pytest.fixture(scope="module")
def tiny_sd1():
    """A tiny SD1 model, its cross-attention widths and a context; one thread (tiny models gain nothing from a
    second one on this shared 2-core machine) and one warm-up call, so that cases time only themselves."""
    from perfusion_ops.patch import cross_attention_layers
    from reference import run_unet
    from support.tiny_models import tiny_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_model("sd1")
    widths = {p: (m.to_v.out_features, m.to_k.out_features)
              for p, m in cross_attention_layers(model.model.diffusion_model).items()}
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    run_unet(model, context)
    yield model, widths, context
    torch.set_num_threads(threads)


SD15_LAYERS = ["input_blocks.1.1.transformer_blocks.0.attn2", "input_blocks.7.1.transformer_blocks.0.attn2",
               "output_blocks.11.1.transformer_blocks.0.attn2", "middle_block.1.transformer_blocks.1.attn2",
               "input_blocks.1.1.transformer_blocks.0.attn1", "input_blocks.1.1.transformer_blocks.0.attn2.to_v",
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2"]


@pytest.mark.host
def test_layers_the_model_does_not_have(tiny_sd1):
    from perfusion_ops.errors import PerfusionError
    from perfusion_ops.patch import apply_concepts
    from reference import run_unet
    model, widths, context = tiny_sd1
    base = small_concept("sd1")
    real = sorted(widths)

    @settings(FUZZ, max_examples=80)
    @given(drop=st.sets(st.sampled_from(real), max_size=2),
           add=st.sets(st.one_of(st.sampled_from(SD15_LAYERS), LAYER), max_size=2),
           width_change=st.one_of(st.none(), st.tuples(st.sampled_from(real), st.sampled_from([1, 7, 321, 1280]))),
           keys=st.sets(st.sampled_from(real), max_size=3),
           key_width_change=st.one_of(st.none(), st.sampled_from([1, 33])))
    def case(drop, add, width_change, keys, key_width_change):
        values = {p: torch.randn(widths[p][0]) for p in real if p not in drop}
        values.update({p: torch.randn(64) for p in add if p not in widths})
        if width_change is not None and width_change[0] in values:
            values[width_change[0]] = torch.randn(width_change[1])
        key_targets = {p: torch.randn(widths[p][1]) for p in keys if p in values}
        if key_width_change is not None and key_targets:
            first = sorted(key_targets)[0]
            key_targets[first] = torch.randn(key_width_change)  # the reader refuses: unlike its value's width
        blob = concept_to_bytes(base.replace(values=values, keys={}))
        header, _ = split(blob)
        tensors = {**safetensors.torch.load(blob), **{f"key.{p}": t for p, t in key_targets.items()}}
        blob = safetensors.torch.save(tensors, header["__metadata__"])
        concept = check_case("layers_the_model_does_not_have", blob)
        if concept is None:  # the reader itself refuses a key target unlike its value in width
            assert any(key_targets[p].shape != values[p].shape for p in key_targets)
            return
        fits = set(values) == set(widths) and all(values[p].shape[0] == widths[p][0] for p in widths)
        try:
            with LineBudget():
                patched = apply_concepts(model, [concept])
        except PerfusionError as error:
            message = str(error)
            assert not fits, message
            assert concept.name in message and len(message) < 1000 and message.isprintable(), message
            CASES[test, "refused by apply_concepts"] += 1
        else:
            assert fits
            assert torch.isfinite(run_unet(patched, context)).all()
            CASES[test, "applied and run"] += 1

    test = "layers_the_model_does_not_have"
    run_counted(test, 60, case)
    assert CASES[test, "refused by apply_concepts"] >= 20 and CASES[test, "applied and run"] >= 1
