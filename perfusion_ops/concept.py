"""The in-memory concept: what one trained Perfusion concept consists of (docs/method.md §1, §6)."""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

import torch

from .errors import PerfusionError

log = logging.getLogger(__name__)

# Context width (d_ctx) the UNet sees, and the text encoders whose word vectors a concept carries.
ARCHITECTURES = {
    "sd1": {"context_dim": 768, "embeddings": {"clip_l": 768}},
    "sd2": {"context_dim": 1024, "embeddings": {"clip_h": 1024}},
    "sdxl": {"context_dim": 2048, "embeddings": {"clip_l": 768, "clip_g": 1280}},
}

# The gate's bias and temperature (docs/method.md §1): the reference's while training, the paper's best at inference.
TRAIN_BETA, TRAIN_TAU = 0.75, 0.10
INFERENCE_BETA, INFERENCE_TAU = 0.70, 0.15
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}")
# Bounds on a concept's numbers (numeric_problem). Text encodings, projection outputs and word vectors are of order
# 0.01-100 (the largest entry of CLIP-L's context, from the SD1.5 covariance: a few hundred); anything beyond
# MAX_ABS_VALUE is damage, and at 1e19 and above the float32 edit overflows. u is exempt: its scale is free
# (it cancels in the gate, rank1.metric_gram) and depends on the scale of C.
MAX_ABS_VALUE = 1e6
MIN_I_STAR_NORM = 1e-3  # a real i* has norm ~30; a vanishing one makes r = uᵀx / uᵀi* overflow


def is_valid_name(name: str) -> bool:
    """A concept name works in prompts (embedding:<name>) and in file names: letters, digits, _ - ."""
    return bool(NAME_PATTERN.fullmatch(name)) and ".." not in name


@dataclass(frozen=True, eq=False)
class Concept:
    """One concept. Vectors are float32 CPU tensors; nothing here has a ``.to`` method on purpose
    (ComfyUI casts any object in a model's patches that has ``.to`` to the model's dtype)."""

    name: str                          # the word written in prompts as embedding:<name>
    superclass: str                    # e.g. "teddy": keys are locked to it
    arch: str                          # "sd1" | "sd2" | "sdxl"
    embeddings: dict[str, torch.Tensor]  # "clip_l" -> [n, 768], ...
    i_star: torch.Tensor               # [d_ctx] target input i*
    u: torch.Tensor                    # [d_ctx] C^-1 i*
    i_super: torch.Tensor              # [d_ctx] superclass encoding, for key-locking
    values: dict[str, torch.Tensor]    # layer path -> o*_V [d_out]
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # optional trained o*_K (absent = locked)
    beta: float = INFERENCE_BETA       # recommended inference gate bias
    tau: float = INFERENCE_TAU         # recommended inference gate temperature
    covariance: str = ""               # fingerprint of the covariance C was estimated with
    train: str = "{}"                  # JSON of the training settings

    @property
    def context_dim(self) -> int:
        return ARCHITECTURES[self.arch]["context_dim"]

    @property
    def layers(self) -> list[str]:
        return sorted(self.values)

    def replace(self, **changes) -> "Concept":
        return dataclasses.replace(self, **changes)


def numeric_problem(concept: Concept) -> str | None:
    """Why `concept`'s numbers cannot be used safely, or None. Shared by the reader and apply_concepts:
    NaN/Inf anywhere, entries beyond ±MAX_ABS_VALUE (except in u), a vanishing i*, or E = uᵀi* <= 0."""
    for key in ("i_star", "u", "i_super"):
        if tuple(getattr(concept, key).shape) != (concept.context_dim,):
            return f"{key} has shape {list(getattr(concept, key).shape)}, expected [{concept.context_dim}]"
    tensors = [(f"embedding.{k}", v) for k, v in concept.embeddings.items()]
    tensors += [(k, getattr(concept, k)) for k in ("i_star", "u", "i_super")]
    tensors += [(f"value.{k}", v) for k, v in concept.values.items()] + [(f"key.{k}", v) for k, v in concept.keys.items()]
    for key, t in tensors:
        t = t.detach()
        if not torch.isfinite(t).all():
            return f"{key} contains NaN or Inf"
        largest = float(t.abs().max()) if t.numel() else 0.0
        if key != "u" and largest > MAX_ABS_VALUE:
            return (f"{key} has entries up to {largest:.3g}; a concept's vectors stay within ±{MAX_ABS_VALUE:g} "
                    "(trained ones are far smaller), so it is damaged")
    i_star, u = concept.i_star.detach().double(), concept.u.detach().double()
    norm = float(i_star.norm())
    if norm < MIN_I_STAR_NORM:
        return (f"i_star has norm {norm:.3g}; a text encoding has a norm of order 1-100 (at least "
                f"{MIN_I_STAR_NORM:g} is needed), else the gate r = uᵀx / uᵀi* overflows")
    energy = float(u @ i_star)
    if not energy > 0:
        return f"u·i_star (the energy E) is {energy:g}; it must be > 0, else the gate is undefined"
    return None


@dataclass(frozen=True, eq=False)
class ConceptSet:
    """What a PERFUSION_CONCEPT socket carries: one or more concepts, applied together."""

    concepts: tuple[Concept, ...]

    def __post_init__(self):
        if not self.concepts:
            raise ValueError("A concept set needs at least one concept.")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]


def check_used_together(concepts: list[Concept], how: str) -> None:
    """Concepts that one set or one model holds: each name once (embedding:<name> must mean one concept), one
    architecture; a warning when their covariances differ, since their gates are then calibrated differently.
    `how` completes the refusal of a repeated name, e.g. "applied twice to the same model"."""
    names = [c.name for c in concepts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PerfusionError(f"Concept(s) {duplicates} {how}.")
    if len({c.arch for c in concepts}) > 1:
        raise PerfusionError("Concepts for different architectures cannot be used together: "
                             + ", ".join(f"{c.name} ({c.arch})" for c in concepts))
    covariances = sorted({c.covariance for c in concepts})
    if len(covariances) > 1:
        log.warning("Perfusion: concepts %s were estimated with different covariances (%s); their gates are "
                    "calibrated differently, so balance them with per-concept beta or strength.", names, covariances)
