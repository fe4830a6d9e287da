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

Per call the edit is one product: h = W x + [str_a g_a, −str_a α_a] · [o*_a; W i*_a], with s computed once and
everything that does not depend on x (1/(E_a τ_a), β_a/τ_a, G⁻ᵀ scaled by the strengths) prepared once per
concept set (ConceptVectors.build): on a GPU every op is a kernel launch, and a UNet call runs 32 (SD1.5) to
140 (SDXL) hooked projections.

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

    i_star: torch.Tensor           # [k, d]  i*_a
    u: torch.Tensor                # [k, d]  u_a = C⁻¹ i*_a, at unit length
    strength: torch.Tensor         # [k]     str_a
    gate_scale: torch.Tensor       # [k]     1 / (E_a τ_a):  (r_a − β_a) / τ_a = s_a · gate_scale_a + gate_shift_a
    gate_shift: torch.Tensor       # [k]     −β_a / τ_a
    removal_weights: torch.Tensor  # [k, k]  s @ removal_weights = −str_a α_a: −G⁻ᵀ diag(str) (exact), −diag(str / E)

    @staticmethod
    def build(i_star, u, strength, beta, tau, exact: bool = True) -> "ConceptVectors":
        i_star, u = torch.as_tensor(i_star).float(), torch.as_tensor(u)
        u, energy, gram = metric_gram(i_star, u)          # float64: G may be ill-conditioned
        as_row = lambda v: torch.as_tensor(v, dtype=torch.float64).reshape(-1).expand(i_star.shape[0]).clone()
        strength, beta, tau = as_row(strength), as_row(beta), as_row(tau)
        # α = G⁻¹ s (exact, several concepts) or α_a = s_a / E_a (approximate, and k = 1, where G = [E]).
        removal = torch.linalg.inv(gram).T if exact and i_star.shape[0] > 1 else torch.diag(1 / energy)
        return ConceptVectors(i_star, u.float(), strength.float(), (1 / (energy * tau)).float(),
                              (-beta / tau).float(), (-removal * strength[None, :]).float())

    def on(self, device) -> "ConceptVectors":
        # Deliberately not named `.to`: ComfyUI casts patch objects with `.to` to the model dtype.
        return ConceptVectors(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def edit(wx: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cv: ConceptVectors) -> torch.Tensor:
    """h = W x + Σ_a str_a (g_a o*_a − α_a W i*_a), as one product of [str_a g_a, −str_a α_a] with `rows`.

    wx: [..., d_out] the projection's own output W x;  x: [..., d] its input;
    rows: [2k, d_out] the targets o*_1..o*_k, then W i*_1..W i*_k through the same projection.
    Returns float32; the caller casts back.
    """
    s = x.float() @ cv.u.T                                                # s_a = u_aᵀ x
    g = torch.sigmoid(torch.addcmul(cv.gate_shift, s, cv.gate_scale))    # g_a = σ((s_a / E_a − β_a) / τ_a)
    weights = torch.cat([g * cv.strength, s @ cv.removal_weights], dim=-1)  # [str_a g_a, −str_a α_a]
    h = torch.addmm(wx.float().flatten(0, -2), weights.flatten(0, -2), rows.float())  # W x + weights · rows
    return h.view(wx.shape)
