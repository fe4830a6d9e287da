"""How well the caption corpus holds up the covariance C (docs/method.md §3): C's eigenvalues against the floor
the inverse puts under them (covariance.RIDGE × their mean), for the corpus before vocabulary tails were added
(tools/make_caption_corpus.prompts, what perfusion_ops/data/captions.txt held before) and the shipped one.

A direction whose eigenvalue is within 10x of the floor is held up by the ridge, not by data: there u = C⁻¹ i* and
the gate input r = uᵀx / uᵀi* are set by the ridge's size, an arbitrary number.

    python benchmarks/bench_covariance_spectrum.py [--write]

Encoders: the tiny test CLIPs (support/tiny_models.py, ComfyUI's classes, random weights) through the pack's own
estimator, and the toy world's CLIP-L (experiments/toy_world/base_model.py: context-free, so C is computed through
its exact context shortcut, checked against the pack's estimator on the first 32 captions).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from common import REPO, boot_comfyui, environment, markdown_table, publish

log = logging.getLogger("bench_covariance_spectrum")
HEADING = "## Covariance: spectrum of C, corpus without and with vocabulary tails"
NEAR_FLOOR = 10.0


def spectrum_row(name: str, corpus_name: str, C, seconds: float) -> list:
    import torch
    from perfusion_ops.covariance import RIDGE
    eigenvalues = torch.linalg.eigvalsh(C.double())
    floor = RIDGE * eigenvalues.clamp_min(0).mean()
    near = float((eigenvalues < NEAR_FLOOR * floor).double().mean())
    return [name, corpus_name, f"{near:.1%}", f"{float(eigenvalues.min() / eigenvalues.mean()):.1e}",
            f"{seconds:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--encoders", default="sd1,sd2,sdxl,toy_world", help="comma-separated subset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    host = boot_comfyui()
    sys.path.insert(0, str(REPO / "tools"))
    sys.path.insert(0, str(REPO / "experiments" / "toy_world"))
    import torch
    import make_caption_corpus
    from perfusion_ops import covariance
    from support.tiny_models import tiny_clip
    corpora = {"prompts only (before)": make_caption_corpus.prompts(), "with vocabulary tails (shipped)":
               covariance.load_corpus()}
    rows, notes = [], []
    for name in args.encoders.split(","):
        if name == "toy_world":
            import base_model
            clip = base_model.build_clip(3)  # experiments/toy_world/run.py BASE_CONFIG["clip_seed"]
            reference = covariance.estimate_covariance(clip, corpora["with vocabulary tails (shipped)"][:32])
            check = base_model.shortcut_covariance(clip, corpora["with vocabulary tails (shipped)"][:32], covariance)
            notes.append(f"toy world shortcut vs the pack's estimator, 32 captions: relative difference "
                         f"{float((check - reference).norm() / reference.norm()):.1e}")
            estimate = lambda corpus: base_model.shortcut_covariance(clip, corpus, covariance)  # noqa: E731
            label = "toy world CLIP-L (768)"
        else:
            clip = tiny_clip(name)
            estimate = lambda corpus: covariance.estimate_covariance(clip, corpus)  # noqa: E731
            label = f"tiny {name} CLIP ({ {'sd1': 768, 'sd2': 1024, 'sdxl': 2048}[name]})"
        for corpus_name, corpus in corpora.items():
            start = time.time()
            with torch.no_grad():
                C = estimate(corpus)
            rows.append(spectrum_row(label, corpus_name, C, time.time() - start))
            log.info("%s", rows[-1])
    env = environment(host)
    body = "\n".join([
        f"`python benchmarks/bench_covariance_spectrum.py --write`; {env['date']}, {env['machine']}, torch "
        f"{env['torch']}, ComfyUI {env['ComfyUI']}. Share of C's eigenvalues within {NEAR_FLOOR:g}x of the floor "
        f"(RIDGE = {covariance.RIDGE:g} x the mean eigenvalue): directions held up by the ridge, not by captions. "
        f"Both corpora have {len(corpora['with vocabulary tails (shipped)'])} captions.", "",
        *markdown_table(["encoder", "corpus", f"eigenvalues within {NEAR_FLOOR:g}x of the floor",
                         "smallest / mean eigenvalue", "seconds"], rows), "",
        *[f"- {note}" for note in notes], ""])
    publish(log, HEADING, body, args.write)


if __name__ == "__main__":
    main()
