"""The text side: `embedding:<name>` in a prompt resolves to a concept's word vectors, in a CLIP clone only.

`CLIP.clone()` shares the tokenizer, so the clone gets shallow copies of the tokenizer and of its
per-encoder tokenizers, whose embedding lookup knows the concepts (perfusion_ops/host.py).
For global key-locking the clone also encodes every prompt a second time with each concept word replaced by
its superclass word, and sends that encoding along with the prompt's to the diffusion model (docs/method.md §1, global key-locking).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging

import torch

from .concept import ARCHITECTURES, Concept
from .host import TEXT_ENCODE, install_embedding_lookup, weight_patch_strengths, weights_as_loaded, with_key_context
from .errors import PerfusionError

log = logging.getLogger(__name__)

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


def clip_with_concepts(clip, concepts: list[Concept], key_locking: str = "local"):
    """A clone of `clip` in which `embedding:<name>` means each concept's learned word vector(s). With
    `key_locking` "global" its encodings also carry the superclass prompt's context (SuperclassKeyContext) for
    every concept applied to this CLIP so far; with "local" they do not. The last call in a chain decides."""
    arch = clip_architecture(clip)
    for concept in concepts:
        if concept.arch != arch:
            raise PerfusionError(f"Concept '{concept.name}' was trained for {concept.arch.upper()}, "
                                 f"but this CLIP belongs to {arch.upper()}.")
    if key_locking not in KEY_LOCKING:
        raise PerfusionError(f"key_locking must be one of {KEY_LOCKING}, got '{key_locking}'.")
    warn_about_setup(clip, concepts)
    patched = clip_with_word_vectors(clip, {c.name: c.embeddings for c in concepts})
    earlier = patched.patcher.object_patches.get(TEXT_ENCODE)
    if isinstance(earlier, SuperclassKeyContext):  # a chain: build on the first node's, not on top of it
        original, all_concepts = earlier.original, earlier.concepts + tuple(concepts)
    else:
        original, all_concepts = patched.patcher.get_model_object(TEXT_ENCODE), tuple(concepts)
    # Installed in both modes: with local locking it only remembers the concepts, for a later global node.
    replacements = superclass_replacements(patched, all_concepts) if key_locking == "global" else None
    patched.patcher.add_object_patch(TEXT_ENCODE, SuperclassKeyContext(original, all_concepts, replacements))
    return patched


KEY_LOCKING = ("local", "global")


def clip_setup(clip) -> str:
    """The text-encoder setup a concept's gate is calibrated for, readable: the clip-skip layer, a fingerprint of
    the text encoders' weights as loaded (a strided sample of every tensor, so GBs need not be hashed) and the
    weight patches (LoRA) on this CLIP. Recorded by training; compared at apply time (warn_about_setup)."""
    digest = hashlib.sha256(type(clip.tokenizer).__name__.encode())
    for name, tensor in sorted(weights_as_loaded(clip.patcher).items()):
        flat = tensor.detach().reshape(-1)
        digest.update(name.encode() + repr(tuple(tensor.shape)).encode())
        digest.update(flat[::max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    patches = weight_patch_strengths(clip.patcher)
    layer = "last layer" if clip.layer_idx is None else f"layer {clip.layer_idx}"
    setup = f"clip skip: {layer}; text encoder weights {digest.hexdigest()[:12]}"
    if patches:
        setup += f"; {len(patches)} patched weights {hashlib.sha256(repr(patches).encode()).hexdigest()[:8]}"
    return setup


def warn_about_setup(clip, concepts) -> None:
    """A warning naming both setups for each concept trained with a differently set-up CLIP (another clip skip,
    another checkpoint's text encoder, a LoRA on it): its u = C⁻¹ i* and i* describe the encodings of that setup,
    so the gate may open too little or too much here. Not an error: a fine-tuned checkpoint is a legitimate use."""
    current = None
    for concept in concepts:
        trained_with = json.loads(concept.train or "{}").get("clip_setup")
        if trained_with is None:
            continue  # trained before the setup was recorded, or made by another tool
        current = current or clip_setup(clip)
        if trained_with != current:
            log.warning("Perfusion: concept '%s' was trained with a CLIP set up differently (%s) from this one (%s); "
                        "its gate may open too little or too much. Use the checkpoint and clip skip it was trained "
                        "with, or check the result with a beta sweep.", concept.name, trained_with, current)


def superclass_tokens(clip, superclass: str) -> dict[str, int]:
    """The superclass word's single token id in each text encoder, or a clear error."""
    word = superclass.strip()
    if not word or len(word.split()) != 1:
        raise PerfusionError(f"The superclass must be one word (e.g. 'teddy', 'cat'), got '{superclass}'.")
    ids = {}
    for encoder in ARCHITECTURES[clip_architecture(clip)]["embeddings"]:
        tokenizer = getattr(clip.tokenizer, encoder)
        pieces = tokenizer.tokenizer(word)["input_ids"][tokenizer.tokens_start:-1]
        if len(pieces) != 1:
            raise PerfusionError(f"The superclass '{word}' is split into {len(pieces)} tokens by the {encoder} "
                                 "tokenizer; choose a common single-token word (e.g. 'teddy' for a teddy bear).")
        ids[encoder] = pieces[0]
    return ids


def superclass_replacements(clip, concepts) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """For each text encoder (its key in the token lists: 'l', 'g', 'h'), every concept's word vector and the token
    id of its superclass word. Global locking swaps one token for one token, so a concept needs one vector."""
    replacements = {}
    for concept in concepts:
        for encoder, token in superclass_tokens(clip, concept.superclass).items():
            vectors = concept.embeddings[encoder]
            if vectors.shape[0] != 1:
                raise PerfusionError(f"Concept '{concept.name}' has {vectors.shape[0]} word vectors for {encoder}; "
                                     "global key-locking needs one (use key_locking 'local').")
            replacements.setdefault(encoder.removeprefix("clip_"), []).append((vectors[0], token))
    return replacements


class SuperclassKeyContext:
    """The CLIP clone's text encoding (an object patch of the text model's encode_token_weights) that returns,
    next to the prompt's context, the context of the same prompt with each concept word's vector replaced by its
    superclass word's token: the input of every key projection under global key-locking. Prompts without a
    concept carry their own context, so every prompt from this CLIP is batched alike in sampling. With
    `replacements` None it only remembers the concepts (local locking)."""

    def __init__(self, original, concepts, replacements):
        self.original, self.concepts, self.replacements = original, tuple(concepts), replacements

    def superclass_prompt(self, token_weight_pairs):
        """The token lists with every concept vector swapped for its superclass token; None if none occurs."""
        swapped, found = {}, False
        for key, chunks in token_weight_pairs.items():
            replacements = self.replacements.get(key, [])
            swapped[key] = []
            for chunk in chunks:
                new_chunk = []
                for item in chunk:
                    token = item[0]
                    if isinstance(token, torch.Tensor):
                        for vector, superclass_token in replacements:
                            if token.shape == vector.shape and torch.equal(token, vector.to(token.dtype)):
                                token, found = superclass_token, True
                                break
                    new_chunk.append((token, *item[1:]))
                swapped[key].append(new_chunk)
        return swapped if found else None

    def __call__(self, token_weight_pairs):
        encoded = self.original(token_weight_pairs)
        if self.replacements is None:
            return encoded
        superclass_prompt = self.superclass_prompt(token_weight_pairs)
        key_context = encoded[0] if superclass_prompt is None else self.original(superclass_prompt)[0]
        return with_key_context(encoded, key_context)


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
