"""An independent float64 implementation of docs/method.md §1-§2, and helpers to probe every cross-attention layer."""
from __future__ import annotations

import torch


def reference_projection(W, x, concepts, exact=True):
    """h = W x + Σ_a str_a (g_a o*_a − α_a W i*_a), everything float64 with explicit matrices.

    concepts: list of dicts with i_star, u, target (o*), strength, beta, tau.
    """
    W, x = W.double(), x.double()
    I = torch.stack([c["i_star"].double() for c in concepts])
    U = torch.stack([c["u"].double() for c in concepts])
    s = x @ U.T                                            # s_a = u_aᵀ x
    energy = torch.einsum("kd,kd->k", U, I)               # E_a = u_aᵀ i*_a
    r = s / energy
    if exact and len(concepts) > 1:
        G = U @ I.T                                        # G_ab = u_aᵀ i*_b
        alpha = torch.linalg.solve(G, s.reshape(-1, len(concepts)).T).T.reshape(s.shape)
    else:
        alpha = r
    h = x @ W.T
    for a, c in enumerate(concepts):
        beta, tau, strength = float(c["beta"]), float(c["tau"]), float(c["strength"])
        g = 1.0 / (1.0 + torch.exp(-(r[..., a] - beta) / tau))
        h = h + strength * (g[..., None] * c["target"].double() - alpha[..., a, None] * (W @ I[a]))
    return h


def random_concept(model, arch, name, seed=0, with_keys=False, context=None, position=4):
    """A random concept shaped for `model`. With `context`, i* is that context's token at `position`
    so that token opens the gate (r = 1) and, in the C⁻¹ metric, the others mostly do not."""
    from perfusion_ops.concept import ARCHITECTURES, Concept
    from perfusion_ops.patch import cross_attention_layers
    g = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(model.model.diffusion_model)
    d = ARCHITECTURES[arch]["context_dim"]
    if context is not None:
        i_star = context[0, position].float().clone()
    else:
        i_star = torch.randn(d, generator=g)
    if context is not None:  # C = the context's own second moment (+ ridge), as a real covariance would be
        X = context[0].double()
        C = X.T @ X / X.shape[0]
        C = C + 0.01 * C.trace() / d * torch.eye(d, dtype=torch.float64)
    else:  # a random SPD C = A Aᵀ/d + I
        A = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
        C = A @ A.T + torch.eye(d, dtype=torch.float64)
    u = torch.linalg.solve(C, i_star.double()).float()
    embeddings = {enc: torch.randn(1, dim, generator=g) for enc, dim in ARCHITECTURES[arch]["embeddings"].items()}
    values = {p: torch.randn(m.to_v.out_features, generator=g) for p, m in layers.items()}
    keys = {p: torch.randn(m.to_k.out_features, generator=g) for p, m in layers.items()} if with_keys else {}
    return Concept(name=name, superclass="teddy", arch=arch, embeddings=embeddings, i_star=i_star, u=u,
                   i_super=torch.randn(d, generator=g), values=values, keys=keys, covariance="test")


def weights_of(model):
    """Every cross-attention to_k/to_v weight of `model`, keyed (layer path, "to_k" | "to_v")."""
    from perfusion_ops.patch import cross_attention_layers
    return {(p, kind): getattr(attn, kind).weight.detach().clone()
            for p, attn in cross_attention_layers(model.model.diffusion_model).items() for kind in ("to_k", "to_v")}


def reference_settings(concepts_settings, path, kind, W):
    """reference_projection's per-concept dicts for one projection; locked keys target W_k i_super."""
    refs = []
    for concept, strength, beta, tau in concepts_settings:
        if kind == "to_v":
            target = concept.values[path]
        else:
            target = concept.keys[path] if path in concept.keys else W.double() @ concept.i_super.double()
        refs.append(dict(i_star=concept.i_star, u=concept.u, target=target, strength=strength, beta=beta, tau=tau))
    return refs


class ProjectionProbe:
    """A DIFFUSION_MODEL wrapper that records every cross-attention to_k/to_v input and (final) output."""

    def __init__(self):
        self.records = {}

    def __call__(self, executor, *args, **kwargs):
        from perfusion_ops.patch import cross_attention_layers
        handles = []
        for path, attn in cross_attention_layers(executor.class_obj).items():
            for kind in ("to_k", "to_v"):
                def hook(module, inputs, output, key=(path, kind)):
                    self.records[key] = (inputs[0].detach().clone(), output.detach().clone())
                handles.append(getattr(attn, kind).register_forward_hook(hook))
        try:
            return executor(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()


def run_unet(model, context, sigma=1.0, seed=0, probe=None, y=None, size=8):
    """One call of the diffusion model at `sigma`, through the patcher's wrappers (as a sampler would)."""
    from comfy.patcher_extension import copy_nested_dicts
    wrappers = copy_nested_dicts(model.wrappers)
    if probe is not None:  # registered last, so its hooks run after the patch's and see the final outputs
        wrappers.setdefault("diffusion_model", {})["zz_probe"] = [probe]
    options = {**model.model_options.get("transformer_options", {}), "wrappers": wrappers,
               "sigmas": torch.tensor([sigma])}
    x = torch.randn(context.shape[0], 4, size, size, generator=torch.Generator().manual_seed(seed))
    kwargs = {"y": y} if y is not None else {}
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([sigma] * context.shape[0]), c_crossattn=context,
                                       transformer_options=options, **kwargs)


def adm_for(model, clip, context_pooled):
    """SDXL's `y` (pooled text + size embeddings); None for models without it."""
    if model.model.adm_channels == 0:
        return None
    return model.model.encode_adm(pooled_output=context_pooled, width=64, height=64)
