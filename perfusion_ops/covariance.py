"""The covariance C: the uncentered second moment of the context tokens the UNet receives (docs/method.md §3).

Estimated for the exact text-encoder setup in use (weights, clip skip) over the caption corpus shipped
in data/captions.txt (see tools/make_caption_corpus.py), counting tokens BOS through EOS and no
padding, and cached by a fingerprint of that setup. Only u = C⁻¹ i* is ever stored in a concept.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from einops import rearrange

from .files import write_atomically
from .text import clip_setup

log = logging.getLogger(__name__)

CORPUS = Path(__file__).with_name("data") / "captions.txt"
CAPTIONS_PER_BATCH = 32


def load_corpus(path: Path = CORPUS) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def text_encoder_fingerprint(clip, corpus: list[str]) -> str:
    """Identifies C: the text-encoder setup (text.clip_setup: tokenizer, weights, clip skip, LoRA) and the corpus."""
    digest = hashlib.sha256(clip_setup(clip).encode())
    digest.update("\n".join(corpus).encode())
    return digest.hexdigest()[:16]


def _content_length(tokens: list, end_token: int) -> int:
    """Number of tokens from BOS through the first EOS (padding excluded); word vectors are not token ids."""
    for index, item in enumerate(tokens[1:], start=1):
        if isinstance(item[0], int) and item[0] == end_token:
            return index + 1
    return len(tokens)


def estimate_covariance(clip, corpus: list[str], on_progress=None) -> torch.Tensor:
    """C = Σ x xᵀ / N over every BOS..EOS context token of every caption, in float64."""
    C, count = None, 0
    for start in range(0, len(corpus), CAPTIONS_PER_BATCH):
        batch = corpus[start:start + CAPTIONS_PER_BATCH]
        tokenized = [clip.tokenize(caption) for caption in batch]
        # One prompt of many 77-token chunks: ComfyUI encodes the chunks as one batch and concatenates them.
        merged = {key: [t[key][0] for t in tokenized] for key in tokenized[0]}
        reference_key = next(iter(merged))
        end_token = getattr(clip.tokenizer, f"clip_{reference_key}").end_token
        with torch.no_grad():
            context = clip.encode_from_tokens(merged).double()
        by_caption = rearrange(context, "1 (caption token) d -> caption token d", caption=len(batch))
        for caption_context, chunk in zip(by_caption, merged[reference_key]):
            x = caption_context[:_content_length(chunk, end_token)]
            C = x.T @ x if C is None else C + x.T @ x
            count += x.shape[0]
        if on_progress is not None:
            on_progress(min(start + CAPTIONS_PER_BATCH, len(corpus)), len(corpus))
    return C / count


RIDGE = 1e-6  # least eigenvalue of C used, relative to C's mean eigenvalue: bounds its condition by ~1e6·d


def inverse(C: torch.Tensor) -> torch.Tensor:
    """C⁻¹ in float64, symmetric positive definite, so that E = i*ᵀ C⁻¹ i* > 0 for every i*.

    Eigenvalues below RIDGE × the mean eigenvalue are raised to it, so a barely-covered direction cannot blow up u.
    (Adding that ridge to C is not enough: a C estimated from few tokens is rank-deficient, and the float32 it is
    cached in rounds its zero eigenvalues to negative ones far larger than a ridge relative to the mean.)"""
    C = C.double()
    eigenvalues, vectors = torch.linalg.eigh((C + C.T) / 2)
    floor = RIDGE * eigenvalues.clamp_min(0).mean()
    return (vectors / eigenvalues.clamp_min(floor)) @ vectors.T


def metric_vector(C_inv: torch.Tensor, i_star: torch.Tensor) -> torch.Tensor:
    """u = C⁻¹ i*, stored per concept so C is never needed at inference."""
    return (C_inv @ i_star.double()).float()


def cached_covariance(clip, cache_dir: Path, on_progress=None) -> tuple[torch.Tensor, str]:
    """C for this CLIP, from the cache when this setup was seen before; returns (C, fingerprint)."""
    import safetensors.torch
    corpus = load_corpus()
    fingerprint = text_encoder_fingerprint(clip, corpus)
    path = Path(cache_dir) / f"{fingerprint}.safetensors"
    if path.is_file():
        try:
            C = _read_covariance(path, context_dim=None)
            log.info("Perfusion: covariance %s from cache", fingerprint)
            return C, fingerprint
        except ValueError as error:  # a damaged cache entry is ours to replace, not the user's problem
            log.warning("Perfusion: %s Estimating it again and replacing the cache entry.", error)
    log.info("Perfusion: estimating the covariance over %d captions (once per text-encoder setup)", len(corpus))
    # Rounded to float32 as the cache keeps it: a first run and a run that reads the cache train the same concept.
    C = estimate_covariance(clip, corpus, on_progress).float().double()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors.torch.save({"covariance": C.float().contiguous()},
                                  metadata={"perfusion.fingerprint": fingerprint, "captions": str(len(corpus))})
    write_atomically(str(path), data)  # an interrupted save leaves no file, not even a temporary one
    return C, fingerprint


def load_covariance_file(path: Path, context_dim: int) -> tuple[torch.Tensor, str]:
    """A user-supplied covariance (safetensors, key `covariance`, [d, d]); fingerprint = its content hash."""
    C = _read_covariance(path, context_dim)
    return C, "file-" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _read_covariance(path: Path, context_dim: int | None) -> torch.Tensor:
    """The `covariance` tensor of a safetensors file as float64, checked: square (of side context_dim when
    given) and finite. Raises ValueError saying what is wrong."""
    import safetensors.torch
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise ValueError(f"Covariance file '{path}' is not a readable safetensors file: {error}") from None
    C = tensors.get("covariance")
    square = C is not None and C.ndim == 2 and C.shape[0] == C.shape[1]
    if not square or (context_dim is not None and C.shape[0] != context_dim):
        side = "d" if context_dim is None else context_dim
        raise ValueError(f"Covariance file '{path}' needs a tensor 'covariance' of shape [{side}, {side}] "
                         f"for this model; found {None if C is None else list(C.shape)}.")
    if not torch.isfinite(C).all():
        raise ValueError(f"Covariance file '{path}' contains NaN or Inf.")
    return C.double()
