"""Training a concept (DESIGN.md §1; the recipe of perfusion-method.md §2).

Learned: the concept's word vector for every text encoder and o*_V of every cross-attention layer.
Keys stay locked to the superclass (o*_K = W_k i_super) unless `train_keys` asks to learn them too (an
ablation: o*_K per layer, started from W_k i_super, stored as the concept's `keys`); i* and i_super are
exponential moving averages (0.99 per step) of the concept's and the superclass's encodings, started from
the superclass.
UNet and text-encoder weights never get gradients: `torch.autograd.grad` asks only for ours.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import asdict, dataclass

import torch

from . import host
from .concept import ARCHITECTURES, INFERENCE_BETA, INFERENCE_TAU, Concept
from .covariance import inverse, metric_vector
from .patch import AppliedConcept, LayerEdit, PerfusionError, cross_attention_layers, model_architecture
from .text import clip_architecture, clip_with_word_vectors

log = logging.getLogger(__name__)
GATE_INPUT_TOLERANCE = 0.5  # |r − 1| on the concept's own word beyond which training warns (see _check_gate_input)

# The prompt templates of the reference recipe (perfusion-method.md §2.2).
TEMPLATES = ["a photo of a {}", "a good photo of a {}", "the photo of a {}", "a good photo of the {}",
             "image of a {}", "image of the {}", "A photograph of {}", "A {} shown in a photo", "A photo of {}"]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 400
    seed: int = 0
    batch_size: int = 4
    value_lr: float = 0.03
    embedding_lr: float = 0.006
    beta: float = 0.75          # training gate
    tau: float = 0.10
    ema: float = 0.99           # i* and i_super moving average, per step
    flip: bool = True
    weight_decay: float = 0.01  # AdamW's default, as in the reference
    train_values: bool = True   # False: learn only the word vectors (textual inversion, for baselines)
    train_keys: bool = False    # True: also learn o*_K per layer (an ablation of key-locking), at value_lr


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


def trainable_clones(model, clip):
    """Clones whose forward passes can be differentiated w.r.t. their inputs: weights loaded as inference tensors
    are copied at use and CLIP layers add out of place (perfusion_ops/host.py). All of it lives on the clones."""
    train_model = model.clone()
    train_clip = clip.clone()
    for patcher in (train_model, train_clip.patcher):
        host.copy_inference_weights_at_use(patcher)
    host.make_clip_differentiable(train_clip.patcher)
    return train_model, train_clip


def encode(clip, prompt: str):
    """Context, pooled output and the token positions that hold word vectors (not token ids)."""
    tokens = clip.tokenize(prompt)
    clip.cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    context, pooled = clip.cond_stage_model.encode_token_weights(tokens)[:2]
    first_chunk = next(iter(tokens.values()))[0]
    positions = [i for i, item in enumerate(first_chunk) if not isinstance(item[0], int)]
    return context, pooled, positions


class _Photos:
    """The training latents (and their mirror images) with their loss weights, drawn in batches."""

    def __init__(self, unet, latents, masks, flipped_latents, flipped_masks):
        self.images = unet.process_latent_in(latents.clone().float())
        self.flipped = None if flipped_latents is None else unet.process_latent_in(flipped_latents.clone().float())
        self.weights = _latent_masks(masks, self.images.shape)
        self.flipped_weights = self.weights if flipped_masks is None else _latent_masks(flipped_masks, self.images.shape)

    def batch(self, size: int, flip: bool, generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(self.images.shape[0], (size,), generator=generator).tolist()
        mirrored = ((torch.rand(size, generator=generator) < 0.5) & flip & (self.flipped is not None)).tolist()
        x0 = torch.stack([(self.flipped if m else self.images)[i] for i, m in zip(index, mirrored)])
        weight = torch.stack([(self.flipped_weights if m else self.weights)[i] for i, m in zip(index, mirrored)])
        return x0, weight


def _encode_prompts(concept_clip, plain_clip, templates, name, superclass):
    """Contexts of the concept prompts (with grad to the word vectors) and the mean encodings, at the
    concept's position, of the concept and of the superclass in the same templates."""
    contexts, pooled, concept_encodings, super_encodings = [], [], [], []
    for template in templates:
        context, pool, positions = encode(concept_clip, template.format(f"embedding:{name}"))
        with torch.no_grad():
            super_context = encode(plain_clip, template.format(superclass))[0]
        contexts.append(context)
        pooled.append(pool)
        concept_encodings.append(context[0, positions[0]].detach())
        super_encodings.append(super_context[0, positions[0]])
    mean = lambda encodings: torch.stack(encodings).mean(0).double().cpu()  # noqa: E731
    return torch.cat(contexts), pooled, mean(concept_encodings), mean(super_encodings)


def _denoising_loss(unet, sampling, x0, weight, context, pooled, generator):
    """Masked ε-MSE at uniformly drawn timesteps (the reference recipe); returns (loss, x0 prediction)."""
    device = context.device
    timesteps = torch.randint(0, 1000, (x0.shape[0],), generator=generator).float()
    sigma = sampling.sigma(timesteps).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    xt = sampling.noise_scaling(sigma, noise, x0.to(device))
    extra = {}
    if unet.adm_channels:  # SDXL: pooled text and size conditioning
        extra["y"] = torch.cat([unet.encode_adm(pooled_output=p, width=x0.shape[-1] * 8, height=x0.shape[-2] * 8)
                                for p in pooled]).to(device)
    x0_prediction = unet.apply_model(xt, sigma, c_crossattn=context, **extra)
    eps_prediction = (xt - x0_prediction) / sigma.view(-1, 1, 1, 1)
    loss = (((eps_prediction.float() - noise.float()) * weight.to(device)[:, None]) ** 2).mean()
    return loss, x0_prediction


@contextlib.contextmanager
def _edit_installed(layers, edit: LayerEdit | None):
    """The Perfusion edit on every cross-attention to_k/to_v, kept through backward; none for `None`."""
    handles = []
    try:
        for path, attn in (layers.items() if edit is not None else ()):
            handles.append(attn.to_k.register_forward_hook(edit.key_hook(path)))
            handles.append(attn.to_v.register_forward_hook(edit.value_hook(path)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def train_concept(model, clip, latents, name: str, superclass: str, covariance: torch.Tensor, covariance_id: str,
                  settings: TrainSettings = TrainSettings(), masks=None, flipped_latents=None, flipped_masks=None,
                  on_step=None) -> tuple[Concept, list[float]]:
    """Learn a concept from `latents` [N, 4, h, w] (VAE output) and optional soft `masks` [N, h, w].

    `on_step(step, loss, x0_prediction)` is called after every step (progress, previews, cancel).
    With `settings.train_values` off only the word vectors are learned (textual inversion, a baseline);
    with `settings.train_keys` on the key targets are learned too instead of locked (an ablation).
    """
    import comfy.model_management as mm
    arch = model_architecture(model)
    if clip_architecture(clip) != arch:
        raise PerfusionError(f"The CLIP ({clip_architecture(clip).upper()}) does not belong to this model ({arch.upper()}).")
    token_ids = superclass_tokens(clip, superclass)
    generator = torch.Generator().manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    C_inv = inverse(covariance)
    train_model, train_clip = trainable_clones(model, clip)
    losses = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            mm.load_models_gpu([train_model, train_clip.patcher], force_full_load=True)
            device = train_model.load_device
            sampling = train_model.get_model_object("model_sampling")
            unet = train_model.model
            layers = cross_attention_layers(unet.diffusion_model)
            photos = _Photos(unet, latents, masks, flipped_latents, flipped_masks)
            embeddings = {encoder: torch.nn.Parameter(_word_embedding(train_clip, encoder, token).float()[None])
                          for encoder, token in token_ids.items()}
            concept_clip = clip_with_word_vectors(train_clip, {name: embeddings})
            values = optimizer = i_star = i_super = None
            keys = {}
            for step in range(settings.steps):
                x0, weight = photos.batch(settings.batch_size, settings.flip, generator)
                templates = [rng.choice(TEMPLATES) for _ in range(settings.batch_size)]
                context, pooled, concept_mean, super_mean = _encode_prompts(concept_clip, train_clip, templates,
                                                                            name, superclass)
                if values is None:  # start from the superclass (first batch), as the reference does
                    i_star, i_super = super_mean.clone(), super_mean.clone()
                    with torch.no_grad():
                        values = {path: torch.nn.Parameter(attn.to_v.forward(i_super.float().to(device)[None, None])[0, 0])
                                  for path, attn in layers.items()}
                        if settings.train_keys:  # start where locking would keep them: W_k i_super
                            keys = {path: torch.nn.Parameter(attn.to_k.forward(i_super.float().to(device)[None, None])[0, 0])
                                    for path, attn in layers.items()}
                    groups = [{"params": list(embeddings.values()), "lr": settings.embedding_lr}]
                    if settings.train_values:
                        groups.append({"params": list(values.values()), "lr": settings.value_lr})
                    if settings.train_keys:
                        groups.append({"params": list(keys.values()), "lr": settings.value_lr})
                    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
                i_star = settings.ema * i_star + (1 - settings.ema) * concept_mean
                i_super = settings.ema * i_super + (1 - settings.ema) * super_mean

                edit = None
                if settings.train_values or settings.train_keys:
                    concept = _concept(name, superclass, arch, embeddings, i_star, metric_vector(C_inv, i_star), i_super,
                                       values, covariance_id, settings, losses, keys=keys)
                    edit = LayerEdit([AppliedConcept(concept, 1.0, settings.beta, settings.tau)], True, device)
                params = [p for group in optimizer.param_groups for p in group["params"]]
                with _edit_installed(layers, edit):
                    loss, x0_prediction = _denoising_loss(unet, sampling, x0, weight, context.to(device), pooled,
                                                          generator)
                    grads = torch.autograd.grad(loss, params)
                for param, grad in zip(params, grads):
                    param.grad = grad
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().item())
                if on_step is not None:
                    on_step(step, losses[-1], x0_prediction.detach())
            with torch.no_grad():  # the finished word in every template, for the gate check below
                own_encoding = _encode_prompts(concept_clip, train_clip, TEMPLATES, name, superclass)[2]
        i_star = i_star.float()  # what the file stores; u is solved from exactly that
        u = metric_vector(C_inv, i_star)
        gate_input = own_gate_input(own_encoding, i_star, u)
        _check_gate_input(name, gate_input)
        final = _concept(name, superclass, arch, embeddings, i_star, u, i_super, values,
                         covariance_id, settings, losses, detach=True, keys=keys, gate_input=gate_input)
        return final, losses
    finally:
        host.unload(train_model, train_clip.patcher)


def own_gate_input(encoding: torch.Tensor, i_star: torch.Tensor, u: torch.Tensor) -> float:
    """r = uᵀx / uᵀi* for x = the concept word's own encoding: the gate input it gets at inference."""
    encoding, i_star, u = encoding.double().cpu(), i_star.double().cpu(), u.double().cpu()
    return float(u @ encoding / (u @ i_star))


def _check_gate_input(name: str, r: float) -> None:
    """The gate σ((r − β)/τ) is built for r ≈ 1 on the concept's own word. i* is an average over training, so
    when the word vector moved fast until the end it lags behind, and r lands far from 1: then the gate is shut
    (r below β) or saturated (r well above 1) at every useful β, and the β/τ knob does nothing."""
    gate = torch.sigmoid(torch.tensor((r - INFERENCE_BETA) / INFERENCE_TAU)).item()
    log.info("Perfusion: '%s' gate input on its own word r = %.2f (gate %.2f at beta %.2f, tau %.2f)",
             name, r, gate, INFERENCE_BETA, INFERENCE_TAU)
    if abs(r - 1.0) > GATE_INPUT_TOLERANCE:
        log.warning("Perfusion: '%s' has gate input r = %.2f on its own word, far from 1, so beta and tau will "
                    "barely change it (i*, an average over training, lags the word vector). Train for more steps "
                    "or with a lower embedding_lr.", name, r)


def _word_embedding(clip, encoder: str, token: int) -> torch.Tensor:
    table = getattr(clip.cond_stage_model, encoder).transformer.get_input_embeddings()
    return table.weight[token].detach().clone().cpu()


def _latent_masks(masks, latent_shape) -> torch.Tensor:
    """Soft masks resized to the latent grid and scaled to a maximum of 1; all ones without masks."""
    n, _, h, w = latent_shape
    if masks is None:
        return torch.ones(n, h, w)
    resized = torch.nn.functional.interpolate(masks.float()[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return resized / resized.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)


def _concept(name, superclass, arch, embeddings, i_star, u, i_super, values, covariance_id, settings, losses,
             detach=False, keys=None, gate_input=None) -> Concept:
    take = (lambda t: t.detach().float().cpu().clone()) if detach else (lambda t: t)
    return Concept(
        name=name, superclass=superclass, arch=arch,
        embeddings={encoder: take(vector) for encoder, vector in embeddings.items()},
        i_star=i_star.float(), u=u.float(), i_super=i_super.float(),
        values={path: take(v) for path, v in values.items()},
        keys={path: take(k) for path, k in (keys or {}).items()},
        beta=INFERENCE_BETA, tau=INFERENCE_TAU, covariance=covariance_id,
        train=json.dumps({**asdict(settings), "final_loss": losses[-1] if losses else None,
                          "gate_input": gate_input}) if detach else "{}")
