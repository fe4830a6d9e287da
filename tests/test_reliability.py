"""Issue 7, reliability under bad input and faults: numerically hostile concepts and interrupted saves.

- Hostile numbers (huge, non-finite, tiny, zero vectors; u nearly orthogonal to i*): each is refused with a
  clear error where it enters (the reader, apply_concepts), or made harmless (u's free scale is normalised,
  a near-degenerate energy E is floored with a warning) and a tiny model then samples finite latents.
- Atomic writes: a save interrupted part-way (exception, KeyboardInterrupt, SIGKILL of the writing process)
  never leaves a file under the final name, cleans up its temporary file where it can, and a temporary file
  left by SIGKILL is not offered by the loader's file list. (An interrupted training run leaves no concept
  file: tests/test_train.py::test_cancel_leaves_no_file_and_no_changed_model.)
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from perfusion_ops.concept_file import ConceptFileError, concept_from_bytes, read_concept, write_concept

REPO = Path(__file__).resolve().parents[1]
NAME = "sksteddy"
PROMPT = f"a photo of embedding:{NAME}"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread on this shared 2-core machine (see test_combine.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- numerically hostile concepts

@pytest.fixture(scope="module")
def sd1():
    """Tiny SD1 model (std 0.2: its cross-attention matters) and CLIP, and a concept whose i* is the encoding of
    embedding:<NAME> in PROMPT, so that token opens the gate while sampling (as in test_nodes_io.py)."""
    from perfusion_ops.text import clip_with_concepts
    from reference import random_concept
    from support.tiny_models import tiny_clip, tiny_model
    model, clip = tiny_model("sd1", std=0.2), tiny_clip("sd1", embedding_directory=[])
    words = random_concept(model, "sd1", NAME, seed=1)
    words_clip = clip_with_concepts(clip, [words])
    with torch.no_grad():
        context = words_clip.encode_from_tokens(words_clip.tokenize(PROMPT))  # BOS a photo of <concept> ...
    concept = random_concept(model, "sd1", NAME, seed=2, context=context, position=4).replace(
        embeddings=words.embeddings)
    return model, clip, concept


@pytest.fixture(scope="module")
def sane_norm(sd1):
    """Norm of the latent sampled with the undamaged concept."""
    model, clip, concept = sd1
    return float(_apply_and_sample(model, clip, [concept]).norm())


def _scaled(field, factor):
    return lambda c: {field: getattr(c, field) * factor}


def _all(field, factor):
    """Every vector of a dict field (values, keys, embeddings) scaled by `factor`."""
    return lambda c: {field: {k: v * factor for k, v in getattr(c, field).items()}}


def _poisoned(field, value):
    def change(c):
        current = getattr(c, field)
        if isinstance(current, dict):
            first = sorted(current)[0]
            poisoned = current[first].clone()
            poisoned.view(-1)[0] = value
            return {field: {**current, first: poisoned}}
        poisoned = current.clone()
        poisoned[0] = value
        return {field: poisoned}
    return change


def _keys(factor):
    return lambda c: {"keys": {k: v * factor for k, v in c.values.items()}}


def _orthogonal_u(epsilon):
    """u nearly orthogonal to i* (i*ᵀC⁻¹i* ≈ 0, as no u = C⁻¹ i* can be): on the two largest entries j, k of i*,
    u_j = i*_k and u_k = -i*_j cancel exactly (also in float32), and u_m = epsilon on the third, so that
    E = uᵀi* = epsilon · i*_m exactly. Subnormal epsilon makes E underflow to 0 in float32."""
    def change(c):
        j, k, m = torch.argsort(c.i_star.abs(), descending=True)[:3].tolist()
        u = torch.zeros_like(c.u)
        u[j], u[k], u[m] = c.i_star[k], -c.i_star[j], epsilon * torch.sign(c.i_star[m])
        assert float(u.double() @ c.i_star.double()) > 0
        return {"u": u}
    return change


def _huge_u_entry(c):
    """One entry of u at 3e38 (float32 max is 3.4e38) where i* is positive: E is positive, u·x overflows float32."""
    j = int(torch.argmax(c.i_star))
    u = torch.zeros_like(c.u)
    u[j] = 3e38
    return {"u": u}


REFUSED, FINITE, CLAMPED = "refused", "finite", "clamped"
# The reader also refuses these, which apply_concepts copes with: E = uᵀi* beyond float32 (harmless once u is
# normalised, but a file never needs it).
READER_REFUSES = {"u_entry_3e38"}
# case: (changes to the concept, outcome at apply, substrings of the error for refusals)
HOSTILE = {
    "values_1e30": (_all("values", 1e30), REFUSED, ["value.", "e+30", "entries"]),
    "values_inf": (_poisoned("values", float("inf")), REFUSED, ["value.", "NaN or Inf"]),
    "values_nan": (_poisoned("values", float("nan")), REFUSED, ["value.", "NaN or Inf"]),
    "values_1e-30": (_all("values", 1e-30), FINITE, None),
    "values_zero": (_all("values", 0.0), FINITE, None),
    "keys_1e30": (_keys(1e30), REFUSED, ["key.", "entries"]),
    "keys_nan": (lambda c: _poisoned("keys", float("nan"))(c.replace(**_keys(1.0)(c))), REFUSED,
                 ["key.", "NaN or Inf"]),
    "keys_zero": (_keys(0.0), FINITE, None),
    "i_super_1e30": (_scaled("i_super", 1e30), REFUSED, ["i_super", "entries"]),
    "i_super_inf": (_poisoned("i_super", float("-inf")), REFUSED, ["i_super", "NaN or Inf"]),
    "i_super_zero": (_scaled("i_super", 0.0), FINITE, None),
    "embedding_1e30": (_all("embeddings", 1e30), REFUSED, ["embedding.clip_l", "entries"]),
    "embedding_nan": (_poisoned("embeddings", float("nan")), REFUSED, ["embedding.clip_l", "NaN or Inf"]),
    "embedding_zero": (_all("embeddings", 0.0), FINITE, None),
    "i_star_1e30": (lambda c: {"i_star": c.i_star * 1e30, "u": c.u * 1e-30}, REFUSED, ["i_star", "entries"]),
    "i_star_and_u_1e30": (lambda c: {"i_star": c.i_star * 1e30, "u": c.u * 1e30}, REFUSED, ["i_star"]),
    "i_star_1e-30": (lambda c: {"i_star": c.i_star * 1e-30, "u": c.u * 1e30}, REFUSED, ["i_star", "norm"]),
    "i_star_and_u_1e-30": (lambda c: {"i_star": c.i_star * 1e-30, "u": c.u * 1e-30}, REFUSED, ["i_star"]),
    "i_star_zero": (lambda c: {"i_star": torch.zeros_like(c.i_star)}, REFUSED, ["i_star"]),
    "i_star_nan": (_poisoned("i_star", float("nan")), REFUSED, ["i_star", "NaN or Inf"]),
    "u_1e30": (_scaled("u", 1e30), FINITE, None),
    "u_1e-30": (_scaled("u", 1e-30), FINITE, None),
    "u_1e-40": (_scaled("u", 1e-40), FINITE, None),  # float32 subnormals
    "u_entry_3e38": (_huge_u_entry, FINITE, None),
    "u_inf": (_poisoned("u", float("inf")), REFUSED, ["u", "NaN or Inf"]),
    "u_zero": (_scaled("u", 0.0), REFUSED, ["energy", "> 0"]),
    "u_negative_energy": (lambda c: {"u": -c.u}, REFUSED, ["energy", "> 0"]),
    "u_nearly_orthogonal_1e-9": (_orthogonal_u(1e-9), CLAMPED, None),
    "u_nearly_orthogonal_1e-30": (_orthogonal_u(1e-30), CLAMPED, None),
    "u_nearly_orthogonal_1e-44": (_orthogonal_u(1e-44), CLAMPED, None),
}


def _apply_and_sample(model, clip, concepts, **settings):
    from perfusion_ops.patch import apply_concepts
    from perfusion_ops.text import clip_with_concepts
    from support.tiny_models import sample
    patched = apply_concepts(model, concepts, **settings)
    return sample(patched, clip_with_concepts(clip, concepts), PROMPT, seed=3)


def _file_bytes(concept) -> bytes:
    """The concept as a file, built without the writer (which refuses what the reader refuses)."""
    tensors = {f"embedding.{k}": v.contiguous().clone() for k, v in concept.embeddings.items()}
    tensors.update({k: getattr(concept, k).contiguous().clone() for k in ("i_star", "u", "i_super")})
    tensors.update({f"value.{k}": v.contiguous().clone() for k, v in concept.values.items()})
    tensors.update({f"key.{k}": v.contiguous().clone() for k, v in concept.keys.items()})
    meta = {"perfusion.format": "1", "perfusion.name": concept.name, "perfusion.superclass": concept.superclass,
            "perfusion.arch": concept.arch, "perfusion.beta": "0.7", "perfusion.tau": "0.15"}
    return safetensors.torch.save(tensors, meta)


@pytest.mark.host
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_concept_is_refused_or_sampled_finite(sd1, sane_norm, case, caplog):
    from perfusion_ops.errors import PerfusionError
    model, clip, concept = sd1
    change, outcome, needles = HOSTILE[case]
    hostile = concept.replace(**change(concept))
    with caplog.at_level(logging.WARNING):
        if outcome == REFUSED:
            with pytest.raises(PerfusionError) as info:
                _apply_and_sample(model, clip, [hostile])
            message = str(info.value)
            assert NAME in message and len(message) < 600 and message.isprintable(), message
            for needle in needles:
                assert needle in message, (needle, message)
        else:
            latent = _apply_and_sample(model, clip, [hostile])
            assert torch.isfinite(latent).all(), f"{case}: non-finite latents"
            # Not just finite: of the size a sane concept gives (measured: within 10% of it).
            assert float(latent.norm()) < 2 * sane_norm, (float(latent.norm()), sane_norm)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and NAME in r.getMessage()]
    if outcome == CLAMPED:
        assert warned and "orthogonal" in warned[0], warned
    else:
        assert not warned, warned
    # The reader refuses the same file, or reads it.
    if outcome == REFUSED or case in READER_REFUSES:
        with pytest.raises(ConceptFileError):
            concept_from_bytes(_file_bytes(hostile))
    else:
        concept_from_bytes(_file_bytes(hostile))


@pytest.mark.host
def test_u_scale_does_not_change_the_edit(sd1):
    """u's scale cancels in r = uᵀx / uᵀi* (and in α): a file storing u×1e30 or u×1e-30 samples as the original."""
    model, clip, concept = sd1
    expected = _apply_and_sample(model, clip, [concept])
    for factor in (1e30, 1e-30):
        got = _apply_and_sample(model, clip, [concept.replace(u=concept.u * factor)])
        err = float((got - expected).norm() / expected.norm())
        assert err < 1e-5, f"u x {factor:g}: relative difference {err:.2e}"


@pytest.mark.host
@pytest.mark.parametrize("setting, value", [("strength", float("nan")), ("beta", float("nan")),
                                            ("beta", float("inf")), ("strength", float("inf")),
                                            ("tau", float("nan")), ("tau", 0.0)])
def test_non_finite_settings_are_refused(sd1, setting, value):
    from perfusion_ops.errors import PerfusionError
    from perfusion_ops.patch import apply_concepts
    model, clip, concept = sd1
    with pytest.raises(PerfusionError, match=setting):
        apply_concepts(model, [concept], **{setting: value})


@pytest.mark.host
@pytest.mark.parametrize("setting, value", [("tau", 1e-30), ("beta", 1e30), ("beta", -1e30), ("strength", 1e-30)])
def test_extreme_but_finite_settings_sample_finite(sd1, setting, value):
    model, clip, concept = sd1
    assert torch.isfinite(_apply_and_sample(model, clip, [concept], **{setting: value})).all()


@pytest.mark.host
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approximate"])
def test_nearly_orthogonal_concept_among_others_samples_finite(sd1, exact, caplog):
    from perfusion_ops.errors import PerfusionError
    from reference import random_concept
    model, clip, concept = sd1
    other = random_concept(model, "sd1", "other", seed=7)
    degenerate = concept.replace(**_orthogonal_u(1e-30)(concept))
    with caplog.at_level(logging.WARNING):
        try:
            latent = _apply_and_sample(model, clip, [other, degenerate], exact=exact)
        except PerfusionError as e:  # exact mode may refuse the set as inseparable; clearly and by name
            assert exact and NAME in str(e), str(e)
            return
    assert torch.isfinite(latent).all()
    assert any("orthogonal" in r.getMessage() and NAME in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- atomic writes

def _small_concept(seed=0):
    """A valid SD1 concept with a few small layers (the file layout is tested in test_concept_file.py)."""
    from perfusion_ops.concept import Concept
    g = torch.Generator().manual_seed(seed)
    i_star = torch.randn(768, generator=g)
    layers = {"input_blocks.1.1.transformer_blocks.0.attn2": 320, "middle_block.1.transformer_blocks.0.attn2": 1280}
    return Concept(name=NAME, superclass="teddy", arch="sd1", embeddings={"clip_l": torch.randn(1, 768, generator=g)},
                   i_star=i_star, u=i_star / (1 + torch.rand(768, generator=g)), i_super=torch.randn(768, generator=g),
                   values={k: torch.randn(w, generator=g) for k, w in layers.items()})


class DiskFull(OSError):
    pass


def _fail_at(monkeypatch, stage, error, temporaries):
    """Make write_concept fail at `stage` with `error`; record the temporary files it creates. At "write" the
    temporary file really holds the first half of the data (flushed) when the error strikes."""
    import perfusion_ops.concept_file as concept_file

    def fail(*args, **kwargs):
        raise error
    real_temporary = tempfile.NamedTemporaryFile

    def temporary(*args, **kwargs):
        tmp = real_temporary(*args, **kwargs)
        temporaries.append(tmp.name)
        if stage == "write":
            def write(data):
                tmp.file.write(bytes(data[:len(data) // 2]))
                tmp.file.flush()
                assert 0 < os.path.getsize(tmp.name) < len(data)
                raise error
            tmp.write = write
        return tmp
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", temporary)
    if stage == "serialise":
        monkeypatch.setattr(concept_file.safetensors.torch, "save", fail)
    elif stage in ("fsync", "chmod", "replace"):
        monkeypatch.setattr(os, stage, fail)
    else:
        assert stage == "write"


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), DiskFull(28, "No space left on device")],
                         ids=["KeyboardInterrupt", "OSError"])
@pytest.mark.parametrize("stage", ["serialise", "write", "fsync", "chmod", "replace"])
def test_save_interrupted_at_any_stage_leaves_no_file_under_the_final_name(tmp_path, monkeypatch, stage, error,
                                                                           existing):
    path = tmp_path / "sub" / "c.safetensors"
    path.parent.mkdir()
    before = None
    if existing:
        write_concept(_small_concept(seed=1), path)
        before = path.read_bytes()
    temporaries: list[str] = []
    _fail_at(monkeypatch, stage, error, temporaries)
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):  # propagated as it is, after cleaning up
            write_concept(_small_concept(seed=2), path)
    else:
        with pytest.raises(ConceptFileError, match="Could not write Perfusion concept .*No space left"):
            write_concept(_small_concept(seed=2), path)
    monkeypatch.undo()
    assert len(temporaries) == (0 if stage == "serialise" else 1)
    assert not any(os.path.exists(t) for t in temporaries), "the temporary file was left behind"
    if existing:  # the old file, whole and unchanged
        assert sorted(os.listdir(path.parent)) == ["c.safetensors"] and path.read_bytes() == before
        read_concept(path)
    else:
        assert os.listdir(path.parent) == []


KILLED_WRITER = """
import os, sys, tempfile, time
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from perfusion_ops.concept_file import write_concept
from test_reliability import _small_concept
real = tempfile.NamedTemporaryFile
def temporary(*args, **kwargs):
    tmp = real(*args, **kwargs)
    def write(data):  # half the file on disk, then hang until killed
        tmp.file.write(bytes(data[:len(data) // 2]))
        tmp.file.flush()
        os.fsync(tmp.file.fileno())
        print(tmp.name, len(data), flush=True)
        time.sleep(120)
    tmp.write = write
    return tmp
tempfile.NamedTemporaryFile = temporary
write_concept(_small_concept(), {path!r})
"""


def _killed_while_writing(path: Path) -> tuple[Path, int]:
    """Run write_concept(path) in a child process and SIGKILL it half-way through writing the file.
    Returns the temporary file it left and the full size it was writing."""
    script = KILLED_WRITER.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)  # a bound, should the child hang while starting
        assert ready, "the writer did not get to writing within 120 s"
        line = child.stdout.readline()  # printed once half the file is on disk
        assert line, f"the writer died early: {child.stderr.read()}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    name, size = line.split()
    return Path(name), int(size)


@pytest.fixture(scope="module")
def killed_save(tmp_path_factory):
    """A save of <NAME>_00001.safetensors whose process was SIGKILLed half-way through writing the file:
    (its folder, the temporary file it left, the full size it was writing)."""
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("POSIX signals")
    folder = tmp_path_factory.mktemp("killed")
    leftover, size = _killed_while_writing(folder / f"{NAME}_00001.safetensors")
    return folder, leftover, size


def test_save_killed_mid_write_leaves_only_a_hidden_partial_file(killed_save):
    folder, leftover, size = killed_save
    path = folder / f"{NAME}_00001.safetensors"
    assert not path.exists(), "a half-written file appeared under the final name"
    # SIGKILL gives no chance to clean up: the temporary file stays, hidden, beside the final name.
    assert os.listdir(folder) == [leftover.name] and leftover.parent == folder
    assert 0 < leftover.stat().st_size < size
    assert leftover.name.startswith(f".{path.name}") and leftover.suffix == ".partial"
    with pytest.raises(ConceptFileError, match="truncated"):  # and it is refused if read by hand
        read_concept(leftover)


@pytest.mark.host
def test_leftover_of_a_killed_save_is_not_offered_and_does_not_disturb_saving(killed_save, perfusion_dir):
    """The load node lists models/perfusion through ComfyUI's folder_paths (extension .safetensors only), and the
    save node numbers files from what it finds: neither sees the temporary file a killed save left."""
    import shutil

    import folder_paths
    import nodes
    from support.comfy_runner import run_prompt
    _, leftover, _ = killed_save
    (perfusion_dir / "mine").mkdir()
    shutil.copy(leftover, perfusion_dir / "mine" / leftover.name)
    folder_paths.filename_list_cache.pop("perfusion", None)
    assert folder_paths.get_filename_list("perfusion") == []
    load_node = nodes.NODE_CLASS_MAPPINGS["PerfusionLoadConcept"]
    assert load_node.INPUT_TYPES()["required"]["concept_name"][1]["options"] == []  # the combo the editor shows
    # The next save takes the name the killed one would have had; only the finished file is listed.
    write_concept(_small_concept(), perfusion_dir / "source.safetensors")
    folder_paths.filename_list_cache.pop("perfusion", None)
    _, outputs = run_prompt({
        "load": {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": "source.safetensors"}},
        "save": {"class_type": "PerfusionSaveConcept", "inputs": {"concept": ["load", 0], "filename_prefix": "mine/{name}"}}})
    assert outputs["save"]["text"] == [f"mine/{NAME}_00001.safetensors"]
    folder_paths.filename_list_cache.pop("perfusion", None)
    assert sorted(folder_paths.get_filename_list("perfusion")) == [f"mine/{NAME}_00001.safetensors",
                                                                   "source.safetensors"]
    read_concept(perfusion_dir / "mine" / f"{NAME}_00001.safetensors")


@pytest.mark.host
def test_interrupted_covariance_cache_write_leaves_no_file(tmp_path, monkeypatch):
    """The train node caches the covariance it estimates; an interrupt while saving it leaves nothing behind,
    and the next run estimates and caches it again."""
    from perfusion_ops import covariance
    from support.tiny_models import tiny_clip
    corpus = covariance.load_corpus()[:8]
    monkeypatch.setattr(covariance, "load_corpus", lambda path=covariance.CORPUS: list(corpus))
    clip = tiny_clip("sd1")

    def interrupt(fd):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", interrupt)
        with pytest.raises(KeyboardInterrupt):
            covariance.cached_covariance(clip, tmp_path)
    assert os.listdir(tmp_path) == []
    C, fingerprint = covariance.cached_covariance(clip, tmp_path)
    assert os.listdir(tmp_path) == [f"{fingerprint}.safetensors"]
    assert torch.equal(covariance.cached_covariance(clip, tmp_path)[0], C.float().double())


@pytest.mark.host
@pytest.mark.parametrize("damage", ["truncated", "wrong key", "not square", "NaN"])
def test_damaged_covariance_cache_entry_is_estimated_again(tmp_path, monkeypatch, caplog, damage):
    """A cache entry that cannot be used (a disk error, a tool that rewrote it) is not the user's problem:
    the train node warns, estimates the covariance again and replaces the entry."""
    import safetensors.torch
    from perfusion_ops import covariance
    from support.tiny_models import tiny_clip
    corpus = covariance.load_corpus()[:8]
    monkeypatch.setattr(covariance, "load_corpus", lambda path=covariance.CORPUS: list(corpus))
    clip = tiny_clip("sd1")
    C, fingerprint = covariance.cached_covariance(clip, tmp_path)
    entry = tmp_path / f"{fingerprint}.safetensors"
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    else:
        bad = {"wrong key": {"cov": C.float()}, "not square": {"covariance": C.float()[:-1]},
               "NaN": {"covariance": torch.full_like(C.float(), float("nan"))}}[damage]
        safetensors.torch.save_file(bad, str(entry))
    with caplog.at_level(logging.WARNING, logger=covariance.log.name):
        again, fingerprint_again = covariance.cached_covariance(clip, tmp_path)
    assert fingerprint_again == fingerprint
    assert any("Estimating it again" in record.getMessage() for record in caplog.records), caplog.text
    assert torch.equal(again, C)
    assert os.listdir(tmp_path) == [entry.name]  # replaced in place, no temporary file left
    assert torch.equal(safetensors.torch.load_file(str(entry))["covariance"], C.float())
