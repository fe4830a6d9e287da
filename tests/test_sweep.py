"""Issue 18: the gate sweep renders one cell per (beta, tau), each what the stock graph renders at that gate."""
import pytest
import torch

from reference import random_concept
from support.tiny_models import register_test_nodes, tiny_clip, tiny_model

pytestmark = pytest.mark.host

PROMPT = "a photo of a teddy on the beach"
TEDDY = 4  # the concept's i* is this token's encoding: its gate input r is 1 there, so beta moves its gate


@pytest.fixture
def concept_file(perfusion_dir):
    from perfusion_ops.concept_file import write_concept
    model, clip = tiny_model("sd1", 0, std=0.2), tiny_clip("sd1", 0, embedding_directory=[])
    context = clip.encode_from_tokens(clip.tokenize(PROMPT))
    write_concept(random_concept(model, "sd1", "hugsy", seed=3, context=context, position=TEDDY),
                  perfusion_dir / "hugsy_00001.safetensors")
    return "hugsy_00001.safetensors"


def graph(concept_file, beta=0.7, tau=0.15, sweep=None):
    """Tiny checkpoint, the concept applied, the prompt encoded; then either a KSampler + VAE Decode at (beta,
    tau) or the sweep node with `sweep` inputs."""
    nodes = {
        "1": {"class_type": "PerfusionTestTinyCheckpoint", "inputs": {"arch": "sd1", "seed": 0, "weight_std": 0.2,
                                                                      "dtype": "float32"}},
        "2": {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": concept_file}},
        "3": {"class_type": "PerfusionApplyConcept", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concept": ["2", 0], "strength": 1.0, "beta": beta, "tau": tau,
            "start_at": 0.0, "end_at": 1.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": PROMPT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": ""}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    sampling = {"seed": 5, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal"}
    if sweep is None:
        nodes["7"] = {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                          "latent_image": ["6", 0], "denoise": 1.0, **sampling}}
        nodes["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}}
    else:
        nodes["8"] = {"class_type": "PerfusionGateSweep", "inputs": {
            "model": ["3", 0], "vae": ["1", 2], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            **sampling, **sweep}}
    nodes["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    return nodes


def test_sweep_renders_labelled_cells_each_equal_to_the_stock_graph_at_its_gate(concept_file):
    from support.comfy_runner import cached_outputs, run_prompt
    register_test_nodes()
    betas, taus = [0.4, 1.3], [0.1, 0.3]
    executor, ui = run_prompt(graph(concept_file, sweep={"betas": "0.4, 1.3", "taus": "0.1 0.3"}))
    sheet, cells = (output[0] for output in cached_outputs(executor, "8"))
    assert cells.shape == (4, 64, 64, 3)
    assert ui["8"]["text"] == ["beta 0.4, tau 0.1", "beta 1.3, tau 0.1", "beta 0.4, tau 0.3", "beta 1.3, tau 0.3"]
    # The grid: 2 rows (taus) x 2 columns (betas) of image + caption strip, each image where its cell goes.
    assert sheet.shape[0] == 1 and sheet.shape[2] == 2 * 64 and sheet.shape[1] > 2 * 64
    cell_height = sheet.shape[1] // 2
    strips = []
    for index, (tau, beta) in enumerate((t, b) for t in taus for b in betas):
        row, column = divmod(index, 2)
        place = sheet[0, row * cell_height:(row + 1) * cell_height, column * 64:(column + 1) * 64]
        assert torch.equal(place[:64], cells[index])
        strips.append(place[64:])
        stock_executor, _ = run_prompt(graph(concept_file, beta=beta, tau=tau))
        stock = cached_outputs(stock_executor, "8")[0][0]
        assert torch.allclose(cells[index], stock, atol=1e-6), f"cell beta {beta} tau {tau} differs from the stock graph"
    assert all(strip.max() > 0.5 for strip in strips), "a caption strip is blank"
    assert len({strip.numpy().tobytes() for strip in strips}) == 4, "two cells carry the same caption"
    assert not torch.allclose(cells[0], cells[1], atol=1e-3), "beta does not change the render: the test shows nothing"


def test_sweep_keeps_each_concepts_tau_without_taus_and_refuses_bad_input_clearly(concept_file):
    from support.comfy_runner import cached_outputs, run_prompt, run_prompt_expecting_error
    register_test_nodes()
    executor, ui = run_prompt(graph(concept_file, tau=0.25, sweep={"betas": "0.6,0.9,1.2"}))
    cells = cached_outputs(executor, "8")[1][0]
    assert ui["8"]["text"] == ["beta 0.6", "beta 0.9", "beta 1.2"] and cells.shape[0] == 3
    stock = cached_outputs(run_prompt(graph(concept_file, beta=0.9, tau=0.25))[0], "8")[0][0]
    assert torch.allclose(cells[1], stock, atol=1e-6)

    assert "'x' is not a number" in run_prompt_expecting_error(graph(concept_file, sweep={"betas": "0.6, x"}))
    assert "outside 0.01..1" in run_prompt_expecting_error(graph(concept_file, sweep={"betas": "0.6", "taus": "5"}))
    assert "betas is empty" in run_prompt_expecting_error(graph(concept_file, sweep={"betas": " , "}))
    plain = graph(concept_file, sweep={"betas": "0.6"})
    plain["8"]["inputs"]["model"] = ["1", 0]
    assert "no Perfusion concept" in run_prompt_expecting_error(plain)
