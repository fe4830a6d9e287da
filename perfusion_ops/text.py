"""The text side: `embedding:<name>` in a prompt resolves to a concept's word vectors, in a CLIP clone only.

`CLIP.clone()` shares the tokenizer, so the clone gets shallow copies of the tokenizer and of its
per-encoder tokenizers, whose embedding lookup knows the concepts (comfyui-host.md §2.2).
"""
from __future__ import annotations

import copy

import torch

from .concept import Concept
from .patch import PerfusionError

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


def _lookup_with(original, vectors: dict[str, torch.Tensor]):
    """An embedding lookup that knows `vectors` and defers to `original` for any other name."""

    def try_get_embedding(embedding_name: str):
        words = embedding_name.split()
        if words:
            word = words[0]
            stripped = word.strip(",")
            if stripped in vectors:
                leftover = " ".join(words[1:])
                if len(stripped) < len(word):  # keep trailing commas as text, as ComfyUI's own lookup does
                    leftover = f"{word[len(stripped):]} {leftover}"
                return vectors[stripped], leftover
        return original(embedding_name)
    return try_get_embedding


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
        if not hasattr(tokenizer, encoder):
            continue
        sub = copy.copy(getattr(tokenizer, encoder))
        sub._try_get_embedding = _lookup_with(sub._try_get_embedding,
                                              {word: vectors[encoder] for word, vectors in words.items()})
        if sub.embedding_directory is None:
            sub.embedding_directory = []  # ComfyUI parses "embedding:" only when a directory is set
        setattr(tokenizer, encoder, sub)
    patched.tokenizer = tokenizer
    return patched
