"""Run the shipped workflows headless, through ComfyUI's own executor, in this process.

By default it runs the whole chain: workflows/perfusion_train_concept.json (train a concept from a folder
of photos, save it, draw a test image) and then workflows/perfusion_generate.json (load the saved concept,
apply it, draw an image from your prompt). Everything it makes goes to --output: images, the loss plot,
and the concept file in <output>/concepts/.

    python tools/run_workflow.py --comfyui ~/ComfyUI --checkpoint ~/ComfyUI/models/checkpoints/v1-5.safetensors \
        --images ~/photos/teddy --name hugsy --superclass teddy --prompt "a photo of embedding:hugsy at the beach"

Without --checkpoint it is a SMOKE RUN: a tiny random model in SD1.5 format (written once to the cache) goes
through the same chain with few steps and small images, to show that everything runs; its images are noise.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # support/ and perfusion_ops/, after ComfyUI (support/__init__.py says why)
from support import comfy_host  # noqa: E402
from support.comfy_runner import PromptFailed, run_prompt  # noqa: E402
from support.tiny_checkpoint import write_placeholder_photos  # noqa: E402
from support.workflow_api import nodes_of_type, object_info_in_process, ui_to_api  # noqa: E402

WORKFLOWS = REPO / "workflows"
DEFAULT_CHAIN = ["perfusion_train_concept.json", "perfusion_generate.json"]
SHIPPED_CONCEPT = "my_concept"
PHOTO_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
SMOKE = {"train_steps": 4, "steps": 4, "size": 64, "resolution": 64, "batch_size": 2, "corpus": 64}
log = logging.getLogger("perfusion.run")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflows", nargs="*", default=DEFAULT_CHAIN,
                        help="workflow files (names in workflows/ or paths), run in order "
                             f"(default: {' then '.join(DEFAULT_CHAIN)})")
    parser.add_argument("--comfyui", type=Path, help="the ComfyUI folder (default: found as the tests find it)")
    parser.add_argument("--checkpoint", type=Path, help="an SD1.x/SD2.x/SDXL checkpoint file; without it: smoke run")
    parser.add_argument("--images", type=Path, help="a folder of 3-10 photos of the concept (for training)")
    parser.add_argument("--masks", type=Path, help="a folder of masks, one per photo with the same file names")
    parser.add_argument("--name", default=SHIPPED_CONCEPT, help="the concept's word: embedding:<name>")
    parser.add_argument("--superclass", default=None, help="one word for what the concept is (default: teddy)")
    parser.add_argument("--concept", action="append", type=Path, default=[],
                        help="a concept file for the workflows' load nodes, in order (repeatable); default: the "
                             "concepts trained in this run")
    parser.add_argument("--prompt", help="the prompt of the generate step; write the concept as embedding:<name>")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the workflow's, 30; smoke run 4)")
    parser.add_argument("--train-steps", type=int, help="training steps (default: the workflow's, 400; smoke run 4)")
    parser.add_argument("--size", type=int, help="image width and height (default: the workflow's; smoke run 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for training and sampling")
    parser.add_argument("--output", type=Path, default=Path("perfusion-output"), help="where results are written")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return parser.parse_args(argv)


class Run:
    """One headless session: ComfyUI booted in this process, folders pointed into --output."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.output = args.output.resolve()
        self.concepts_dir = self.output / "concepts"
        self.input_dir = self.output / "input"
        self.smoke = args.checkpoint is None
        self.trained: list[str] = []
        self.written: list[Path] = []

    # -- set-up ---------------------------------------------------------------------------------------
    def boot(self) -> None:
        host = (self.args.comfyui or comfy_host.find_comfyui(REPO))
        if host is None or not comfy_host.is_comfyui(Path(host)):
            raise SystemExit(f"No ComfyUI found{f' at {host}' if host else ''}: pass --comfyui /path/to/ComfyUI.")
        import torch
        cpu = self.args.cpu or not torch.cuda.is_available()
        comfy_host.boot(Path(host), cpu=cpu, fp32_text_encoder=cpu)  # float16 matmuls are very slow on CPUs
        import comfy.utils
        comfy.utils.set_progress_bar_global_hook(_log_progress)
        self._point_folders()

    def _point_folders(self) -> None:
        import folder_paths
        for folder in (self.output, self.concepts_dir, self.input_dir, self.output / "temp"):
            folder.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(self.output))
        folder_paths.set_input_directory(str(self.input_dir))
        folder_paths.set_temp_directory(str(self.output / "temp"))
        folder_paths.add_model_folder_path("perfusion", str(self.concepts_dir), is_default=True)
        checkpoint = self.args.checkpoint or self._smoke_checkpoint()
        folder_paths.add_model_folder_path("checkpoints", str(checkpoint.resolve().parent), is_default=True)
        self.checkpoint_name = checkpoint.name
        self._stage_photos()

    def _smoke_checkpoint(self) -> Path:
        log.warning("SMOKE RUN: no --checkpoint, so a tiny random SD1.5-format model is used, with %d training "
                    "steps, %d sampling steps and %dx%d images. It shows that the whole chain runs; its images "
                    "are NOISE. Pass --checkpoint for real results.", SMOKE["train_steps"], SMOKE["steps"],
                    SMOKE["size"], SMOKE["size"])
        from support.tiny_checkpoint import write_tiny_checkpoint
        path = comfy_host.cache_dir() / "smoke" / "tiny-sd15-v1.safetensors"
        if not path.is_file():
            log.info("writing the tiny smoke-run checkpoint to %s (once)", path)
            write_tiny_checkpoint(path)
        return path

    def _stage_photos(self) -> None:
        """Copy the photos (and masks) to <output>/input/<name>/, where the folder loader finds them."""
        target = self.input_dir / self.args.name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        if self.args.images is not None:
            photos = sorted(p for p in self.args.images.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
            if not photos:
                raise SystemExit(f"No photos (.png, .jpg, .jpeg, .webp) in {self.args.images}.")
            for photo in photos:
                shutil.copy2(photo, target / photo.name)
        elif self.smoke:
            write_placeholder_photos(target)
        if self.args.masks is not None:
            (target / "mask").mkdir()
            for mask in sorted(p for p in self.args.masks.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES):
                shutil.copy2(mask, target / "mask" / mask.name)

    # -- running ----------------------------------------------------------------------------------------
    def run(self, workflow_file: Path) -> None:
        workflow = json.loads(workflow_file.read_text())
        info = object_info_in_process({node["type"] for node in workflow["nodes"]})
        prompt = ui_to_api(workflow, info)
        self._override(prompt)
        before = set(self.concepts_dir.glob("*.safetensors"))
        log.info("running %s (%d nodes)", workflow_file.name, len(prompt))
        started = time.perf_counter()
        try:
            _, outputs = run_prompt(prompt, prompt_id=workflow_file.stem)
        except PromptFailed as error:
            raise SystemExit(f"{workflow_file.name}: {error}") from None
        log.info("finished %s in %.1f s", workflow_file.name, time.perf_counter() - started)
        new_concepts = sorted(set(self.concepts_dir.glob("*.safetensors")) - before)
        self.trained += [p.name for p in new_concepts]
        self.written += new_concepts + self._images(outputs)

    def _override(self, prompt: dict) -> None:
        args, smoke = self.args, self.smoke
        for node in nodes_of_type(prompt, "CheckpointLoaderSimple"):
            node["inputs"]["ckpt_name"] = self.checkpoint_name
        for node in nodes_of_type(prompt, "PerfusionLoadPhotos"):  # masks come from <folder>/mask when present
            node["inputs"]["folder"] = args.name
            if smoke:
                node["inputs"]["size"] = SMOKE["resolution"]
        for node in nodes_of_type(prompt, "PerfusionTrainConcept"):
            inputs = node["inputs"]
            inputs["name"], inputs["seed"] = args.name, args.seed
            if args.superclass:
                inputs["superclass"] = args.superclass
            if args.train_steps or smoke:
                inputs["steps"] = args.train_steps or SMOKE["train_steps"]
            if smoke:
                inputs["resolution"], inputs["batch_size"] = SMOKE["resolution"], SMOKE["batch_size"]
                inputs["gradient_accumulation"] = 1
                inputs["covariance"] = self._smoke_covariance()
        concept_files = [p.resolve() for p in args.concept]
        for index, node in enumerate(nodes_of_type(prompt, "PerfusionLoadConcept")):
            node["inputs"]["concept_name"] = self._concept_name(index, concept_files, node["inputs"]["concept_name"])
        for node in nodes_of_type(prompt, "CLIPTextEncode"):
            if node["_meta"]["title"].startswith("Prompt"):
                node["inputs"]["text"] = args.prompt or node["inputs"]["text"].replace(
                    f"embedding:{SHIPPED_CONCEPT} ", f"embedding:{args.name} ")
        for node in nodes_of_type(prompt, "KSampler"):
            node["inputs"]["seed"] = args.seed
            if args.steps or smoke:
                node["inputs"]["steps"] = args.steps or SMOKE["steps"]
        size = args.size or (SMOKE["size"] if smoke else None)
        for node in nodes_of_type(prompt, "EmptyLatentImage"):
            if size:
                node["inputs"]["width"] = node["inputs"]["height"] = size

    def _concept_name(self, index: int, concept_files: list[Path], shipped: str) -> str:
        if index < len(concept_files):
            import folder_paths
            folder_paths.add_model_folder_path("perfusion", str(concept_files[index].parent))
            return concept_files[index].name
        if index < len(self.trained):
            return self.trained[index]
        return shipped

    def _smoke_covariance(self) -> str:
        """A covariance from a small part of the caption corpus, so the smoke run does not spend minutes on it."""
        import folder_paths
        import comfy.sd
        import safetensors.torch
        name = "smoke_covariance.safetensors"
        folder = self.output / "covariance"
        folder.mkdir(exist_ok=True)
        folder_paths.add_model_folder_path("perfusion_covariance", str(folder), is_default=True)
        if not (folder / name).is_file():
            from perfusion_ops import covariance  # pure functions: any import of them will do
            clip = comfy.sd.load_checkpoint_guess_config(
                folder_paths.get_full_path_or_raise("checkpoints", self.checkpoint_name),
                output_vae=False, output_model=False)[1]
            corpus = covariance.load_corpus()[:SMOKE["corpus"]]
            C = covariance.estimate_covariance(clip, corpus)
            safetensors.torch.save_file({"covariance": C.float().contiguous()}, str(folder / name))
            log.info("smoke run: covariance estimated from %d captions (a real run uses all %d)",
                     len(corpus), len(covariance.load_corpus()))
        return name

    def _images(self, outputs: dict) -> list[Path]:
        files = []
        for node_output in outputs.values():
            for image in node_output.get("images", []):
                if image.get("type") == "output":
                    files.append(self.output / image.get("subfolder", "") / image["filename"])
        return files


def _log_progress(value, total, preview, node_id=None) -> None:
    """Progress of long nodes (training, sampling) in the log, about ten lines per node."""
    step = max(1, total // 10)
    if value == total or value % step == 0:
        log.info("  progress %d/%d", value, total)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    workflow_files = [Path(w) if Path(w).is_file() else WORKFLOWS / w for w in args.workflows]
    for workflow_file in workflow_files:
        if not workflow_file.is_file():
            raise SystemExit(f"No workflow {workflow_file}; shipped ones: "
                             f"{', '.join(p.name for p in sorted(WORKFLOWS.glob('*.json')))}")
    for option, path in (("--checkpoint", args.checkpoint), ("--images", args.images), ("--masks", args.masks)):
        if path is not None and not (path.is_dir() if option != "--checkpoint" else path.is_file()):
            raise SystemExit(f"{option} {path}: no such {'file' if option == '--checkpoint' else 'folder'}.")
    for concept in args.concept:
        if not concept.is_file():
            raise SystemExit(f"--concept {concept}: no such file.")
    trains = any("PerfusionTrainConcept" in w.read_text() for w in workflow_files)
    if trains and args.images is None and args.checkpoint is not None:
        raise SystemExit("Training needs photos: pass --images <folder of 3-10 photos of the concept>.")
    session = Run(args)
    session.boot()
    started = time.perf_counter()
    for workflow_file in workflow_files:
        session.run(workflow_file)
    log.info("done in %.1f s; wrote:", time.perf_counter() - started)
    for path in session.written:
        log.info("  %s", path)
    if session.smoke:
        log.warning("This was a SMOKE RUN on a tiny random model: the images are noise.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
