"""The in-memory concept: what one trained Perfusion concept consists of (DESIGN.md §1, §3)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

# Context width (d_ctx) the UNet sees, and the text encoders whose word vectors a concept carries.
ARCHITECTURES = {
    "sd1": {"context_dim": 768, "embeddings": {"clip_l": 768}},
    "sd2": {"context_dim": 1024, "embeddings": {"clip_h": 1024}},
    "sdxl": {"context_dim": 2048, "embeddings": {"clip_l": 768, "clip_g": 1280}},
}

TRAIN_BETA, TRAIN_TAU = 0.75, 0.10
INFERENCE_BETA, INFERENCE_TAU = 0.70, 0.15
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}")


def is_valid_name(name: str) -> bool:
    """A concept name works in prompts (embedding:<name>) and in file names: letters, digits, _ - ."""
    return bool(NAME_PATTERN.fullmatch(name)) and ".." not in name


@dataclass(frozen=True, eq=False)
class Concept:
    """One concept. Vectors are float32 CPU tensors; nothing here has a ``.to`` method on purpose
    (ComfyUI casts any patch object with ``.to`` to the model dtype, see comfyui-host.md §1.5)."""

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
