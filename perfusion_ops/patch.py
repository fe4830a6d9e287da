"""Perfusion on a ComfyUI model: forward hooks on every cross-attention to_k / to_v.

The hooks live only for one call of the diffusion model, installed by a DIFFUSION_MODEL wrapper on a
ModelPatcher clone (docs/method.md §4). So the edit is per clone and leaves nothing on the shared module
(replacing the to_k/to_v modules instead would bypass the LoRA and weight patches ComfyUI applies to them),
and `W x` / `W i*` come from the live projection: LoRA (baked or lowvram), casts, fp8 and offloading apply to
them exactly as ComfyUI applies them everywhere else. Several concepts, also from chained apply nodes, share
one joint patch (docs/method.md §2).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace

import torch

from . import rank1
from .concept import ARCHITECTURES, INFERENCE_BETA, INFERENCE_TAU, Concept, check_used_together, numeric_problem
from .errors import PerfusionError
from .host import DIFFUSION_MODEL_WRAPPER, KEY_CONTEXT
from .text import KEY_LOCKING

log = logging.getLogger(__name__)

WRAPPER_KEY = "perfusion"


def cross_attention_layers(diffusion_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every cross-attention block (module path -> attn2 module), discovered from the model itself."""
    return {name: module for name, module in diffusion_model.named_modules()
            if name.split(".")[-1] == "attn2" and hasattr(module, "to_k") and hasattr(module, "to_v")}


def model_architecture(model) -> str:
    """'sd1' | 'sd2' | 'sdxl' for a ModelPatcher, from the width of the text context its UNet takes."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    layers = cross_attention_layers(diffusion_model) if diffusion_model is not None else {}
    if not layers:
        raise PerfusionError(f"This model ({type(model.model).__name__}) has no cross-attention layers, "
                             "so Perfusion cannot edit it. Use an SD1.x, SD2.x or SDXL model.")
    context_dim = next(iter(layers.values())).to_k.in_features
    for arch, spec in ARCHITECTURES.items():
        if spec["context_dim"] == context_dim:
            return arch
    raise PerfusionError(f"Unsupported model: its cross-attention takes {context_dim}-wide text context; "
                         "Perfusion supports SD1.x (768), SD2.x (1024) and SDXL (2048).")


def check_concept_fits(concept: Concept, diffusion_model: torch.nn.Module, arch: str) -> None:
    if concept.arch != arch:
        raise PerfusionError(f"Concept '{concept.name}' was trained for {concept.arch.upper()}, "
                             f"but this model is {arch.upper()}. Train or load a concept for this model.")
    layers = cross_attention_layers(diffusion_model)
    missing, extra = sorted(set(layers) - set(concept.values)), sorted(set(concept.values) - set(layers))
    if missing or extra:
        raise PerfusionError(f"Concept '{concept.name}' does not match this model's cross-attention layers "
                             f"(model has {len(layers)}, concept {len(concept.values)}; "
                             f"missing {missing[:3]}, unknown {extra[:3]}). Was it trained on another model variant?")
    for path, attn in layers.items():
        for kind, targets in (("to_v", concept.values), ("to_k", concept.keys)):
            if path in targets and targets[path].shape[-1] != getattr(attn, kind).out_features:
                raise PerfusionError(f"Concept '{concept.name}': {kind} target of {path} has width "
                                     f"{targets[path].shape[-1]}, the model's layer {getattr(attn, kind).out_features}.")


def check_numbers(concept: Concept) -> None:
    """Refuse a concept whose numbers would make NaN/Inf (concept.numeric_problem); warn when its u is so nearly
    orthogonal to its i* that the edit floors the gate's normalisation E (rank1.metric_gram)."""
    problem = numeric_problem(concept)
    if problem:
        raise PerfusionError(f"Concept '{concept.name}' cannot be applied: {problem}.")
    cosine = rank1.energy_cosine(concept.i_star, concept.u)
    if cosine < rank1.ENERGY_FLOOR:
        log.warning("Perfusion: concept '%s' has u nearly orthogonal to i* (cosine %.3g; u = C⁻¹ i* is never below "
                    "%g), so its gate normalisation E = uᵀi* is clamped. The concept is probably damaged.",
                    concept.name, cosine, rank1.ENERGY_FLOOR)


def check_separable(concepts: list[Concept], limit: float = 1e-3) -> None:
    """Exact mode solves with G_ab = u_aᵀ i*_b; concepts whose i* are (nearly) linearly dependent make it
    singular. Refuse them by name when the smallest singular value of the normalised G is below `limit`."""
    if len(concepts) < 2:
        return
    _, _, gram = rank1.metric_gram(torch.stack([c.i_star for c in concepts]), torch.stack([c.u for c in concepts]))
    scale = gram.diagonal().abs().sqrt()
    _, singular, vh = torch.linalg.svd(gram / scale[:, None] / scale[None, :])
    if singular[-1] < limit:
        involved = [c.name for c, weight in zip(concepts, vh[-1]) if abs(weight) > 0.1]
        raise PerfusionError(f"Concepts {involved} have (almost) linearly dependent directions i*, so they cannot be "
                             "separated exactly. Apply fewer of them together, or set multi_concept_mode to "
                             "'approximate'.")


def warn_about_crossed_gates(applied, first_new: int = 0) -> None:
    """Warn when concept a's gate opens at least half on concept b's word: a's gate input at b's trained
    encoding, r_ab = u_aᵀ i*_b / E_a (rank1.metric_gram), at or above a's beta. Then embedding:b also takes part
    of a's value: the two look alike in the metric of C, as two concepts trained on similar photos can
    (docs/method.md §2). Only pairs with a concept from applied[first_new:], so that a chain of
    apply nodes warns about each pair once."""
    if len(applied) < 2:
        return
    _, energy, gram = rank1.metric_gram(torch.stack([a.concept.i_star for a in applied]),
                                        torch.stack([a.concept.u for a in applied]))
    r = gram / energy[:, None]  # r[a, b]: concept a's gate input at i*_b (1 on the diagonal)
    for a, mine in enumerate(applied):
        for b, other in enumerate(applied):
            if a != b and max(a, b) >= first_new and r[a, b] >= mine.beta:
                log.warning("Perfusion: concept '%s' opens its gate on the word of '%s' too (gate input %.2f there, "
                            "beta %.2f: gate %.2f), so embedding:%s also takes part of '%s'. The two look alike to the "
                            "text encoder, as concepts trained on similar photos can. %s", mine.concept.name,
                            other.concept.name, r[a, b], mine.beta, _gate(r[a, b], mine), other.concept.name,
                            mine.concept.name, _crossed_gate_advice(mine, float(r[a, b])))


def _gate(r, applied) -> float:
    return float(rank1.gate(torch.as_tensor(r, dtype=torch.float64), applied.beta, applied.tau))


def _crossed_gate_advice(applied, r_other: float) -> str:
    """A beta of r + 2τ shuts the gate on the other word to σ(−2) = 0.12; it helps while the gate on the concept's
    own word (gate input 1) stays more than half open, i.e. r + 2τ < 1."""
    beta = r_other + 2 * applied.tau
    if beta < 1:
        own = _gate(1.0, replace(applied, beta=beta))
        return (f"Give '{applied.concept.name}' its own apply node with beta {beta:.2f} (its gate then 0.12 there "
                f"and {own:.2f} on its own word).")
    return (f"No beta separates them: one that shuts '{applied.concept.name}' there also shuts it on its own word. "
            "Retrain them with masks or with more distinct photos.")


@dataclass(frozen=True, eq=False)
class AppliedConcept:
    """A concept as one apply node added it: its own strength, gate and sigma window."""

    concept: Concept
    strength: float
    beta: float
    tau: float
    sigma_start: float = math.inf  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0

    def active_at(self, sigma: float | None) -> bool:
        if self.strength == 0:
            return False
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start


def current_sigma(transformer_options: dict) -> float | None:
    sigmas = transformer_options.get("sigmas")
    return None if sigmas is None else float(sigmas.detach().reshape(-1)[0])


class ConceptTensors:
    """What the hooks of one diffusion-model call need for the active concepts, on the context's device: the
    stacked vectors of the gate (rank1.ConceptVectors), i_super, and each layer's targets; and the hooks."""

    def __init__(self, applied: list[AppliedConcept], exact: bool, device):
        concepts = [a.concept for a in applied]
        self.vectors = rank1.ConceptVectors.build(
            torch.stack([c.i_star for c in concepts]), torch.stack([c.u for c in concepts]),
            [a.strength for a in applied], [a.beta for a in applied], [a.tau for a in applied], exact).on(device)
        self.i_super = torch.stack([c.i_super for c in concepts]).to(device)
        self.values = {path: torch.stack([c.values[path] for c in concepts]).to(device) for path in concepts[0].values}
        # Trained key targets where a concept has them (ablations, imports), one entry per concept, None for a
        # concept locked to W_k i_super; the whole entry is None where every concept is locked (the normal case).
        self.keys = {}
        for path in concepts[0].values:
            trained = [c.keys[path].to(device) if path in c.keys else None for c in concepts]
            self.keys[path] = None if all(t is None for t in trained) else trained
        self._inputs = {}

    def projection_inputs(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[i*] for the value projections and [i_super; i*] for the key projections, in the context's dtype, as a
        batch of one sequence (the shape a projection is always called with). Their images W i* and W i_super
        are computed anew in every call, through the live projection: LoRA hooks with keyframes, weight patches
        and lowvram casting may all change W between calls."""
        if dtype not in self._inputs:
            i_star = self.vectors.i_star
            self._inputs[dtype] = (i_star.to(dtype)[None], torch.cat([self.i_super, i_star]).to(dtype)[None])
        return self._inputs[dtype]

    def value_hook(self, path: str):
        targets = self.values[path]

        def hook(module, inputs, output):
            x = inputs[0]
            # module.forward, not module(...): calling the module would run this hook again.
            w_i_star = module.forward(self.projection_inputs(x.dtype)[0])[0]
            return rank1.edit(output, x, torch.cat([targets, w_i_star.to(targets.dtype)]), self.vectors).to(output.dtype)
        return hook

    def key_hook(self, path: str):
        trained = self.keys[path]

        def hook(module, inputs, output):
            x = inputs[0]
            # module.forward, not module(...): calling the module would run this hook again. Its rows are
            # [W_k i_super; W_k i*]: the locked key targets o*_K = W_k i_super (key-locking), then W_k i*.
            rows = module.forward(self.projection_inputs(x.dtype)[1])[0]
            if trained is not None:
                k = len(trained)
                targets = [rows[a] if t is None else t.to(rows.dtype) for a, t in enumerate(trained)]
                rows = torch.cat([torch.stack(targets), rows[k:]])
            return rank1.edit(output, x, rows, self.vectors).to(output.dtype)
        return hook

    def global_key_hooks(self, path: str, context: torch.Tensor, key_context: torch.Tensor):
        """Global key-locking (docs/method.md §1, global key-locking): a pre-hook that hands the key projection the superclass
        prompt's context wherever it would get the prompt's own, so every token's key is W_k c_super, and a hook
        that leaves those keys as they are. Where another patch passes the projection a context of its own,
        that call gets the local edit."""
        local = self.key_hook(path)

        def swap_input(module, inputs):
            if inputs[0] is context:
                return (key_context, *inputs[1:])

        def hook(module, inputs, output):
            return output if inputs[0] is key_context else local(module, inputs, output)
        return swap_input, hook


class PerfusionPatch:
    """DIFFUSION_MODEL wrapper holding every concept applied to one model clone (a joint patch).

    A plain callable without `.to`, so ComfyUI never casts the concept tensors it holds.
    """

    def __init__(self, applied: tuple[AppliedConcept, ...], exact: bool = True, key_locking: str = "local"):
        self.applied = tuple(applied)
        self.exact = exact
        self.key_locking = key_locking
        self._warned_key_context = False
        self._cache: dict = {}
        self._layers: tuple = (None, {})  # (diffusion model, its cross-attention layers), found once
        # Only a start_at/end_at window needs the current sigma. Reading it makes a Python number of a tensor,
        # which splits a torch.compile'd diffusion model into several graphs, so it is read only then.
        self.windowed = any(a.sigma_start != math.inf or a.sigma_end != 0.0 for a in self.applied)

    def layers_of(self, diffusion_model) -> dict[str, torch.nn.Module]:
        if self._layers[0] is not diffusion_model:
            self._layers = (diffusion_model, cross_attention_layers(diffusion_model))
        return self._layers[1]

    def tensors_for(self, active: tuple[int, ...], device) -> ConceptTensors:
        key = (active, str(device))
        if key not in self._cache:
            self._cache.clear()  # one entry is enough: the active set changes at most at a window edge
            self._cache[key] = ConceptTensors([self.applied[i] for i in active], self.exact, device)
        return self._cache[key]

    def __call__(self, executor, *args, **kwargs):
        key_context = kwargs.pop(KEY_CONTEXT, None)  # the diffusion model itself has no use for it
        transformer_options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        sigma = current_sigma(transformer_options or {}) if self.windowed else None
        active = tuple(i for i, a in enumerate(self.applied) if a.active_at(sigma))
        if not active:
            return executor(*args, **kwargs)
        context = args[2] if len(args) > 2 else kwargs["context"]
        key_inputs = self.key_inputs(context, key_context) if self.key_locking == "global" else None
        with hooks_installed(self.layers_of(executor.class_obj), self.tensors_for(active, context.device), key_inputs):
            return executor(*args, **kwargs)

    def key_inputs(self, context, key_context):
        """(context, key context) for global key-locking, or None (local locking) with a warning, once, when the
        prompt did not come with a key context of its shape (a CLIP without global locking, conditioning
        concatenated after encoding, CLIP hooks with a schedule)."""
        if key_context is not None and key_context.shape == context.shape:
            return context, key_context.to(device=context.device, dtype=context.dtype)
        if not self._warned_key_context:
            self._warned_key_context = True
            found = "none" if key_context is None else f"shape {tuple(key_context.shape)}"
            log.warning("Perfusion: global key-locking needs the prompt encoded by the CLIP of the apply node with "
                        "key_locking 'global' (key context: %s, prompt %s); using local locking for it.",
                        found, tuple(context.shape))
        return None


@contextlib.contextmanager
def hooks_installed(layers: dict[str, torch.nn.Module], tensors: ConceptTensors | None, key_inputs=None):
    """The edit's forward hooks on every cross-attention to_k / to_v of `layers` while the block runs (for
    training: through its backward pass too); no hooks for `None`. `key_inputs` = (context, key context) selects
    global key-locking."""
    handles = []
    try:
        for path in (tensors.values if tensors is not None else ()):
            if key_inputs is None:
                handles.append(layers[path].to_k.register_forward_hook(tensors.key_hook(path)))
            else:
                swap_input, hook = tensors.global_key_hooks(path, *key_inputs)
                handles.append(layers[path].to_k.register_forward_pre_hook(swap_input))
                handles.append(layers[path].to_k.register_forward_hook(hook))
            handles.append(layers[path].to_v.register_forward_hook(tensors.value_hook(path)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def applied_concepts(model) -> tuple[AppliedConcept, ...]:
    """The concepts already applied to a ModelPatcher by this pack (empty if none)."""
    patches = model.get_wrappers(DIFFUSION_MODEL_WRAPPER, WRAPPER_KEY)
    return patches[0].applied if patches else ()


def apply_concepts(model, concepts, strength: float = 1.0, beta: float = INFERENCE_BETA, tau: float = INFERENCE_TAU,
                   start_at: float = 0.0, end_at: float = 1.0, exact: bool = True, key_locking: str = "local"):
    """A clone of `model` with `concepts` added to its joint Perfusion patch. The input stays untouched.
    `exact` and `key_locking` hold for the whole joint patch: the last call in a chain decides."""
    _check_tau(tau)
    for setting, value in (("strength", strength), ("beta", beta)):
        _check_finite(setting, value)
    if key_locking not in KEY_LOCKING:
        raise PerfusionError(f"key_locking must be one of {KEY_LOCKING}, got '{key_locking}'.")
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise PerfusionError(f"start_at ({start_at}) must not be after end_at ({end_at}); both lie in 0..1.")
    arch = model_architecture(model)
    for concept in concepts:
        check_concept_fits(concept, model.model.diffusion_model, arch)
        check_numbers(concept)
    previous = applied_concepts(model)
    check_used_together([a.concept for a in previous] + list(concepts),
                        "applied twice to the same model. Apply each concept once; to change its settings, change "
                        "the node that applies it")
    if exact:
        check_separable([a.concept for a in previous] + list(concepts))
    sampling = model.get_model_object("model_sampling")
    sigma_start = math.inf if start_at <= 0 else float(sampling.percent_to_sigma(start_at))
    sigma_end = 0.0 if end_at >= 1 else float(sampling.percent_to_sigma(end_at))
    added = tuple(AppliedConcept(c, float(strength), float(beta), float(tau), sigma_start, sigma_end) for c in concepts)
    warn_about_crossed_gates(previous + added, first_new=len(previous))
    return _with_joint_patch(model, PerfusionPatch(previous + added, exact, key_locking))


def with_gate(model, beta: float, tau: float | None = None):
    """A clone of `model` whose applied concepts all use gate bias `beta` (and temperature `tau`, when given)
    instead of what their apply nodes set; everything else of the joint patch stays. For sweeps of the gate,
    which needs no retraining (docs/method.md §1)."""
    patches = model.get_wrappers(DIFFUSION_MODEL_WRAPPER, WRAPPER_KEY)
    if not patches:
        raise PerfusionError("The model has no Perfusion concept: connect the MODEL of a Perfusion Apply Concept.")
    _check_finite("beta", beta)
    if tau is not None:
        _check_tau(tau)
    patch = patches[0]
    applied = tuple(replace(a, beta=float(beta), tau=a.tau if tau is None else float(tau)) for a in patch.applied)
    return _with_joint_patch(model, PerfusionPatch(applied, patch.exact, patch.key_locking))


def _with_joint_patch(model, patch: PerfusionPatch):
    """A clone of `model` whose joint Perfusion patch is `patch` (in place of any it had)."""
    patched = model.clone()
    patched.remove_wrappers_with_key(DIFFUSION_MODEL_WRAPPER, WRAPPER_KEY)
    patched.add_wrapper_with_key(DIFFUSION_MODEL_WRAPPER, WRAPPER_KEY, patch)
    return patched


def _check_tau(tau: float) -> None:
    if tau <= 0 or not math.isfinite(tau):
        raise PerfusionError(f"tau must be a positive number, got {tau}.")


def _check_finite(setting: str, value: float) -> None:
    if not math.isfinite(value):
        raise PerfusionError(f"{setting} must be a finite number, got {value}.")
