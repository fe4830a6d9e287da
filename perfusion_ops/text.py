"""The text side: `embedding:<name>` in a prompt resolves to a concept's word vectors, in a CLIP clone only.

`CLIP.clone()` shares the tokenizer, so the clone gets shallow copies of the tokenizer and of its
per-encoder tokenizers, whose embedding lookup knows the concepts (perfusion_ops/host.py).
"""
from __future__ import annotations

import copy

import torch

from .concept import Concept
from .host import install_embedding_lookup
from .errors import PerfusionError

# Tokenizer attribute of each text encoder; it equals the concept file's embedding key.
ENCODER_ATTRIBUTES = ("clip_l", "clip_g", "clip_h")


def clip_architecture(clip) -> str:
    present = {attr for attr in ENCODER_ATTRIBUTES if hasattr(clip.tokenizer, attr)}
    if present == {"clip_l"}:
        return "sd1"
    if present == {"clip_h"}:
        return "sd2"
    if present == {"clip_l", "clip_g"}:
        return "sdxl"
    raise PerfusionError(f"Unsupported CLIP ({type(clip.tokenizer).__name__}): Perfusion needs the text encoders "
                         "of SD1.x (CLIP-L), SD2.x (OpenCLIP-H) or SDXL (CLIP-L and bigG).")


def clip_with_concepts(clip, concepts: list[Concept]):
    """A clone of `clip` in which `embedding:<name>` means each concept's learned word vector(s)."""
    arch = clip_architecture(clip)
    for concept in concepts:
        if concept.arch != arch:
            raise PerfusionError(f"Concept '{concept.name}' was trained for {concept.arch.upper()}, "
                                 f"but this CLIP belongs to {arch.upper()}.")
    return clip_with_word_vectors(clip, {c.name: c.embeddings for c in concepts})


def clip_with_word_vectors(clip, words: dict[str, dict[str, torch.Tensor]]):
    """A clone of `clip` where `embedding:<word>` is words[word][encoder] for each text encoder."""
    patched = clip.clone()
    tokenizer = copy.copy(patched.tokenizer)
    for encoder in ENCODER_ATTRIBUTES:
        if hasattr(tokenizer, encoder):
            setattr(tokenizer, encoder, install_embedding_lookup(getattr(tokenizer, encoder),
                                                                 {word: v[encoder] for word, v in words.items()}))
    patched.tokenizer = tokenizer
    return patched
