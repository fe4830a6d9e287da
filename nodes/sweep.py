"""Render the same seed at several gate settings in one queue, to pick beta (and tau) by eye."""
from __future__ import annotations

import itertools
import re

import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..perfusion_ops.patch import with_gate
from .common import CATEGORY, with_search_aliases
from .images import captioned, grid
from .render import preview, render

DEFAULT_BETAS = "0.5, 0.6, 0.7, 0.8"  # around the paper's 0.6-0.75 (docs/method.md §1)
MAX_CELLS = 64


def parse_values(text: str, what: str, low: float, high: float) -> list[float]:
    """Numbers separated by commas or spaces, each within [low, high]."""
    values = []
    for item in (part for part in re.split(r"[,\s]+", text.strip()) if part):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{what}: '{item}' is not a number; write numbers separated by commas.") from None
        if not low <= value <= high:
            raise ValueError(f"{what}: {value:g} is outside {low:g}..{high:g}.")
        values.append(value)
    return values


class PerfusionGateSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PerfusionGateSweep",
            display_name="Perfusion Gate Sweep (beta/tau)",
            category=f"{CATEGORY}/apply",
            description="Renders the same seed once per gate setting, with every concept of the model at that beta "
                        "(and tau), and lays the images out on a grid captioned with each value: pick the beta that "
                        "balances the concept's likeness against the prompt, without retraining.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Perfusion Apply Concept (one or more concepts)."),
                io.Vae.Input("vae", tooltip="The VAE to decode the renders."),
                io.Conditioning.Input("positive", tooltip="The prompt with embedding:<name>, encoded with the CLIP "
                                                          "from Perfusion Apply Concept."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Latent.Input("latent_image", tooltip="The latent to start from (e.g. Empty Latent Image); "
                                                        "each cell renders its first image."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="One seed for every cell, so that only the gate differs between them."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampler steps of each cell."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="The sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The scheduler."),
                io.String.Input("betas", default=DEFAULT_BETAS,
                                tooltip="Gate biases to render, separated by commas (one column each). Higher: more "
                                        "of the prompt, less of the concept."),
                io.String.Input("taus", default="", optional=True,
                                tooltip="Gate temperatures, separated by commas (one row each); empty keeps the tau "
                                        "each concept was applied with."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="All cells on one image, each captioned with its "
                                                                  "beta and tau."),
                     io.Image.Output(display_name="images", tooltip="The cells' images as a batch, uncaptioned, "
                                                                    "row by row.")],
            **with_search_aliases(["beta sweep", "tau sweep", "gate", "xy plot", "perfusion grid"]),
        )

    @classmethod
    def execute(cls, model, vae, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                betas, taus="") -> io.NodeOutput:
        beta_values = parse_values(betas, "betas", -1.0, 2.0)
        tau_values = parse_values(taus, "taus", 0.01, 1.0) or [None]
        if not beta_values:
            raise ValueError("betas is empty: give at least one gate bias, e.g. 0.6, 0.7.")
        cells = list(itertools.product(tau_values, beta_values))  # row by row: one tau per row
        if len(cells) > MAX_CELLS:
            raise ValueError(f"{len(cells)} cells; at most {MAX_CELLS} (fewer betas or taus).")
        latent = latent_image["samples"][:1]
        progress = comfy.utils.ProgressBar(len(cells))
        images, captions = [], []
        for index, (tau, beta) in enumerate(cells):
            gated = with_gate(model, beta, tau)
            image = render(gated, vae, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler)[0]
            caption = f"beta {beta:g}" + ("" if tau is None else f", tau {tau:g}")
            images.append(image)
            captions.append(caption)
            progress.update_absolute(index + 1, len(cells), preview(image))
        sheet = grid([captioned(image, caption) for image, caption in zip(images, captions)], len(beta_values))
        return io.NodeOutput(sheet, torch.stack(images), ui={"text": captions})
