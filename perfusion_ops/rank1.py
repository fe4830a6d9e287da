"""The gated rank-1 key/value edit of Perfusion (docs/method.md §1 and §2), as plain tensor math.

For one projection W (a cross-attention to_k or to_v) and k concepts a = 1..k:

    s_a = u_aᵀ x                    u_a = C⁻¹ i*_a, stored per concept
    E_a = u_aᵀ i*_a                 energy of concept a
    r_a = s_a / E_a                 how much x looks like concept a (its gate input)
    g_a = σ((r_a − β_a) / τ_a)      concept a's own gate
    G_ab = u_aᵀ i*_b,  α = G⁻¹ s    joint removal of all concepts' directions (exact mode)
    α_a = r_a                       each concept on its own (approximate mode, and k = 1)
    h = W x + Σ_a str_a (g_a o*_a − α_a W i*_a)

With k = 1 this is h = W x + str · (g · o* − r · W i*). All of it is computed in float32.

u's scale cancels in r and in α, so u is used at unit length (float32 stays in range for any stored scale).
E is floored at ENERGY_FLOOR · |u| |i*|: a u = C⁻¹ i* of any covariance this pack estimates (its ridge bounds
the condition number of C by ~1e6·d) is far above it, so the floor only catches a u (nearly) orthogonal to i*,
where r = uᵀx / E would blow up; apply_concepts warns about such a concept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ENERGY_FLOOR = 1e-5  # least E / (|u| |i*|), the cosine between u and i*


def energy_cosine(i_star: torch.Tensor, u: torch.Tensor) -> float:
    """uᵀi* / (|u| |i*|) in float64; below ENERGY_FLOOR the edit floors E (see metric_gram)."""
    i_star, u = i_star.detach().double(), u.detach().double()
    return float(u @ i_star / (u.norm() * i_star.norm()))


def metric_gram(i_star: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-length u_a, floored E_a and G_ab = u_aᵀ i*_b with the floored E_a on its diagonal, in float64.
    i_star, u: [k, d]."""
    i_star, u = i_star.detach().double(), u.detach().double()
    u = u / u.norm(dim=-1, keepdim=True)              # u's scale cancels in r = s / E and in α = G⁻¹ s
    energy = torch.maximum((u * i_star).sum(-1), ENERGY_FLOOR * i_star.norm(dim=-1))
    gram = u @ i_star.T
    gram.diagonal().copy_(energy)
    return u, energy, gram


def gate(r: torch.Tensor, beta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """g = σ((r − β) / τ), elementwise per concept."""
    return torch.sigmoid((r - beta) / tau)


@dataclass(frozen=True, eq=False)
class ConceptVectors:
    """The per-set quantities the edit needs, stacked over concepts (row a = concept a)."""

    i_star: torch.Tensor         # [k, d]   i*_a
    u: torch.Tensor              # [k, d]   u_a = C⁻¹ i*_a, at unit length
    energy: torch.Tensor         # [k]      E_a, floored
    removal: torch.Tensor | None  # [k, k]  G⁻ᵀ, so that α = s @ removal; None = approximate (α = r)
    strength: torch.Tensor       # [k]
    beta: torch.Tensor           # [k]
    tau: torch.Tensor            # [k]

    @staticmethod
    def build(i_star, u, strength, beta, tau, exact: bool = True) -> "ConceptVectors":
        i_star, u = torch.as_tensor(i_star).float(), torch.as_tensor(u)
        u, energy, gram = metric_gram(i_star, u)          # float64: G may be ill-conditioned
        removal = None
        if exact and i_star.shape[0] > 1:
            removal = torch.linalg.inv(gram).T.float()
        as_row = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(-1).expand(i_star.shape[0]).clone()
        return ConceptVectors(i_star, u.float(), energy.float(), removal, as_row(strength), as_row(beta), as_row(tau))

    def on(self, device) -> "ConceptVectors":
        # Deliberately not named `.to`: ComfyUI casts patch objects with `.to` to the model dtype.
        move = lambda t: None if t is None else t.to(device)
        return ConceptVectors(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def coefficients(x: torch.Tensor, cv: ConceptVectors) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate inputs r [..., k] and removal coefficients α [..., k] for context tokens x [..., d]."""
    s = x @ cv.u.T
    r = s / cv.energy
    alpha = r if cv.removal is None else s @ cv.removal
    return r, alpha


def edit(wx: torch.Tensor, x: torch.Tensor, w_i_star: torch.Tensor, targets: torch.Tensor,
         cv: ConceptVectors) -> torch.Tensor:
    """h = W x + Σ_a str_a (g_a o*_a − α_a W i*_a).

    wx: [..., d_out] the projection's own output W x;  x: [..., d] its input;
    w_i_star: [k, d_out] W i*_a through the same projection;  targets: [k, d_out] o*_a.
    Returns float32; the caller casts back.
    """
    r, alpha = coefficients(x.float(), cv)
    g = gate(r, cv.beta, cv.tau)
    return wx.float() + (cv.strength * g) @ targets.float() - (cv.strength * alpha) @ w_i_star.float()
