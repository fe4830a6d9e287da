"""Where a concept's gate opens over a set of prompts: on its own word, and on the other tokens (docs/method.md §1).

The gate g = σ((r − β)/τ), r = uᵀx / uᵀi*, should open for the concept's word and for nothing else. A prompt's
other tokens whose gate opens receive the concept's value: the concept leaks into them. `gate_report` encodes the
prompts with a CLIP that knows the concept (text.clip_with_concepts) and counts, at one β/τ, the share of the
other tokens (BOS through EOS, no padding) whose gate is above one half, next to the concept word's own r and g.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .concept import INFERENCE_BETA, INFERENCE_TAU, Concept
from .covariance import _content_length
from .rank1 import gate

OPEN = 0.5  # a gate above this counts as open


@dataclass(frozen=True)
class GateReport:
    leak: float             # share of the other tokens whose gate is open
    other_tokens: int       # how many other tokens were counted
    own_r: float            # mean r of the concept's word
    own_gate: float         # mean gate of the concept's word
    own_tokens: int         # how many times the concept's word occurred
    leaking: tuple          # (prompt index, token position, r) of every open other token


def prompt_context(clip, prompt: str) -> tuple[torch.Tensor, list[int]]:
    """The encoding [tokens, d] (float64) of `prompt` from BOS through the first EOS of its first chunk, and the
    positions that hold a word vector rather than a token id (the concepts' words, for a CLIP that knows them)."""
    tokens = clip.tokenize(prompt)
    chunk = next(iter(tokens.values()))[0]
    tokenizer = next(getattr(clip.tokenizer, a) for a in ("clip_l", "clip_h", "clip_g") if hasattr(clip.tokenizer, a))
    length = _content_length(chunk, tokenizer.end_token)
    with torch.no_grad():
        context = clip.encode_from_tokens(tokens)[0, :length].double()
    return context, [i for i, item in enumerate(chunk[:length]) if not isinstance(item[0], int)]


def token_gate_inputs(clip, concept: Concept, prompt: str) -> tuple[torch.Tensor, list[int]]:
    """r of every token of `prompt` (prompt_context) and the positions that hold a word vector."""
    context, positions = prompt_context(clip, prompt)
    u, i_star = concept.u.double(), concept.i_star.double()
    return context @ u / (u @ i_star), positions


def gate_report(clip, concept: Concept, prompts: list[str], beta: float = INFERENCE_BETA,
                tau: float = INFERENCE_TAU) -> GateReport:
    own, others, leaking = [], 0, []
    for index, prompt in enumerate(prompts):
        r, positions = token_gate_inputs(clip, concept, prompt)
        g = gate(r, beta, tau)
        own += [(float(r[p]), float(g[p])) for p in positions]
        for position in range(len(r)):
            if position in positions:
                continue
            others += 1
            if g[position] > OPEN:
                leaking.append((index, position, float(r[position])))
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    return GateReport(leak=len(leaking) / others if others else float("nan"), other_tokens=others,
                      own_r=mean([r for r, _ in own]), own_gate=mean([g for _, g in own]), own_tokens=len(own),
                      leaking=tuple(leaking))
