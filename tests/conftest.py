"""Test session bootstrap: boot the real ComfyUI host (when one is found) and load the pack through its loader.

With a host, `perfusion_ops` is the very package ComfyUI loaded (so objects made by tests and by nodes
are of the same classes). Without one, `perfusion_ops` is imported from the repository and every test
that needs the host is skipped, with one loud line saying so.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("comfy_host", REPO / "tools" / "comfy_host.py")
comfy_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfy_host)

HOST = comfy_host.find_comfyui(REPO)
PACK = None
NO_HOST_LINE = ("!!! NO COMFYUI HOST FOUND: every test that needs ComfyUI is SKIPPED (not passed). "
                "Run `bash tools/test.sh`, or set COMFYUI_PATH. !!!")


def _boot_host():
    """Import ComfyUI as a library on the CPU and load this pack with ComfyUI's custom-node loader."""
    global PACK
    sys.path.insert(0, str(HOST))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported (comfyui-host.md §6.1)
    import utils.install_util  # noqa: F401  (as main.py does: before nodes.py puts comfy/ first on sys.path)
    import nodes
    logging.getLogger().setLevel(logging.WARNING)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    loaded = asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))
    if not loaded:
        raise RuntimeError("ComfyUI's custom-node loader failed to load the pack; see the log above.")
    PACK = sys.modules[str(REPO).replace(".", "_x_")]
    # Make `import perfusion_ops...` in tests return the modules ComfyUI loaded.
    prefix = PACK.__name__ + ".perfusion_ops"
    for name, module in list(sys.modules.items()):
        if name == prefix or name.startswith(prefix + "."):
            sys.modules["perfusion_ops" + name[len(prefix):]] = module


if HOST is not None:
    _boot_host()
else:
    sys.path.append(str(REPO))


def pytest_report_header(config):
    return f"ComfyUI host: {HOST}" if HOST else NO_HOST_LINE


def pytest_collection_modifyitems(config, items):
    if HOST is None:
        for item in items:
            if "host" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="no ComfyUI host (see the loud line above)"))


def pytest_terminal_summary(terminalreporter):
    if HOST is None:
        terminalreporter.write_line(NO_HOST_LINE, red=True, bold=True)


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
    """The shipped corpus, cut short so the tiny CLIP estimates C in seconds (only the count changes)."""
    from perfusion_ops import covariance
    corpus = covariance.load_corpus()[:SMALL_CORPUS]
    monkeypatch.setattr(covariance, "load_corpus", lambda path=covariance.CORPUS: list(corpus))
    return corpus


@pytest.fixture(scope="module")
def host():
    """The ComfyUI checkout (for tests that start its server); skipped loudly when none is found."""
    if HOST is None:
        pytest.skip("no ComfyUI host (see the loud line above)")
    return HOST
