"""Test session bootstrap: boot the real ComfyUI host (when one is found) and load the pack through its loader.

With a host, `perfusion_ops` is the very package ComfyUI loaded (so objects made by tests and by nodes
are of the same classes). Without one, `perfusion_ops` is imported from the repository and every test
that needs the host is skipped, with one loud line saying so.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# At the end of sys.path: ComfyUI's checkout goes first, so the pack's nodes/ never shadows ComfyUI's nodes.
sys.path.append(str(REPO))
from support import comfy_host  # noqa: E402

HOST = comfy_host.find_comfyui(REPO)
HOST_NAME = comfy_host.selected_host().name
HOST_VERSION = comfy_host.comfyui_version(HOST) if HOST else None
PACK = None
NO_HOST_LINE = (f"!!! NO COMFYUI HOST FOUND ({HOST_NAME}): every test that needs ComfyUI is SKIPPED (not passed). "
                "Run `bash tools/test.sh [--host minimum|current]`. !!!")


if HOST is None and os.environ.get("PERFUSION_REQUIRE_HOST") == "1":
    raise pytest.UsageError(f"PERFUSION_REQUIRE_HOST=1 but no ComfyUI host was found for {HOST_NAME} "
                            f"(see `python support/comfy_host.py --host {HOST_NAME}`)")
if HOST is not None:
    PACK = comfy_host.boot(HOST)
    logging.getLogger().setLevel(logging.WARNING)
    # Make `import perfusion_ops...` in tests return the modules ComfyUI loaded (same classes as the nodes use).
    prefix = PACK.__name__ + ".perfusion_ops"
    for name, module in list(sys.modules.items()):
        if name == prefix or name.startswith(prefix + "."):
            sys.modules["perfusion_ops" + name[len(prefix):]] = module


def pytest_report_header(config):
    return f"ComfyUI host ({HOST_NAME}): v{HOST_VERSION} at {HOST}" if HOST else NO_HOST_LINE


def pytest_collection_modifyitems(config, items):
    if HOST is None:
        for item in items:
            if "host" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="no ComfyUI host (see the loud line above)"))


def pytest_terminal_summary(terminalreporter):
    """One line per run saying which host ran and how many of the tests that need it passed (.ci/run prints it)."""
    if HOST is None:
        terminalreporter.write_line(NO_HOST_LINE, red=True, bold=True)
        return
    counts = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        reports = [r for r in terminalreporter.stats.get(outcome, []) if getattr(r, "when", "call") in ("call", "setup")]
        counts[outcome] = sum(1 for r in reports if "host" in getattr(r, "keywords", {}))
    terminalreporter.write_line(f"[host {HOST_NAME} v{HOST_VERSION}] tests that need the host: {counts['passed']} passed, "
                                f"{counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped")


@pytest.fixture(scope="session")
def pack():
    """The pack module as ComfyUI loaded it."""
    return PACK


@pytest.fixture
def perfusion_dir(tmp_path, monkeypatch):
    """models/perfusion and the output directory pointed at temporary folders."""
    import folder_paths
    concepts = tmp_path / "models" / "perfusion"
    concepts.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "perfusion", ([str(concepts)], {".safetensors"}))
    folder_paths.filename_list_cache.pop("perfusion", None)
    output = tmp_path / "output"
    output.mkdir()
    old_output, old_temp = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    folder_paths.set_output_directory(str(output))
    (tmp_path / "temp").mkdir()
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    yield concepts
    folder_paths.set_output_directory(old_output)
    folder_paths.set_temp_directory(old_temp)
    folder_paths.filename_list_cache.pop("perfusion", None)


SMALL_CORPUS = 16


@pytest.fixture
def small_corpus(monkeypatch):
    """A short corpus, so the tiny CLIP estimates C in seconds: the first prompts of the shipped corpus without
    their vocabulary tails (tools/make_caption_corpus.prompts). 16 captions cannot cover the vocabulary anyway,
    and the training tests' thresholds were set on these captions (with the tails, float32 and bfloat16 training
    in tests/test_train_precision.py agreed less: cosine 0.85-0.87)."""
    import importlib.util
    from perfusion_ops import covariance
    spec = importlib.util.spec_from_file_location("make_caption_corpus", REPO / "tools" / "make_caption_corpus.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    corpus = generator.prompts()[:SMALL_CORPUS]
    monkeypatch.setattr(covariance, "load_corpus", lambda path=covariance.CORPUS: list(corpus))
    return corpus


@pytest.fixture(scope="module")
def host():
    """The ComfyUI checkout (for tests that start its server); skipped loudly when none is found."""
    if HOST is None:
        pytest.skip("no ComfyUI host (see the loud line above)")
    return HOST
