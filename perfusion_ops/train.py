"""Training a concept (the recipe of the reference implementation, with the changes named below).

Learned: the concept's word vector for every text encoder and o*_V of every cross-attention layer.
Keys stay locked to the superclass (o*_K = W_k i_super) unless `train_keys` asks to learn them too (an
ablation: o*_K per layer, started from W_k i_super, stored as the concept's `keys`). During training i* and
i_super are exponential moving averages (0.99 per micro-batch) of the concept's and the superclass's encodings,
started from the superclass; the file's i* is the finished word's own encoding (docs/method.md §5).
UNet and text-encoder weights never get gradients: `torch.autograd.grad` asks only for ours. The learned tensors,
optimizer and loss are float32 whatever dtype the model runs in (perfusion_ops/precision.py).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass

import torch

from . import host
from .concept import INFERENCE_BETA, INFERENCE_TAU, TRAIN_BETA, TRAIN_TAU, Concept
from .covariance import inverse, metric_vector
from .precision import describe, loss_scale_for
from .errors import PerfusionError
from .patch import AppliedConcept, ConceptTensors, cross_attention_layers, hooks_installed, model_architecture
from .rank1 import gate
from .text import clip_architecture, clip_setup, clip_with_word_vectors, superclass_tokens

log = logging.getLogger(__name__)
GATE_INPUT_TOLERANCE = 0.5  # |r − 1| on the concept's own word beyond which training warns (see _check_gate_input)

# The prompt templates of the reference implementation's training data set.
TEMPLATES = ["a photo of a {}", "a good photo of a {}", "the photo of a {}", "a good photo of the {}",
             "image of a {}", "image of the {}", "A photograph of {}", "A {} shown in a photo", "A photo of {}"]
# Prompts the concept is not trained on, where training measures its own word's gate input (_check_gate_input).
GATE_CHECK_PROMPTS = ["a {} on the beach", "a watercolor painting of a {}", "a {} in the garden at sunset",
                      "a close-up photo of the {} on a table", "two friends and a {} in a park"]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 400
    seed: int = 0
    batch_size: int = 4
    value_lr: float = 0.03
    embedding_lr: float = 0.006
    beta: float = TRAIN_BETA    # training gate
    tau: float = TRAIN_TAU
    ema: float = 0.99           # i* and i_super moving average, per micro-batch
    flip: bool = True
    weight_decay: float = 0.01  # AdamW's default, as in the reference
    train_values: bool = True   # False: learn only the word vectors (textual inversion, for baselines)
    train_keys: bool = False    # True: also learn o*_K per layer (an ablation of key-locking), at value_lr
    gradient_accumulation: int = 4     # micro-batches per step: 4 x batch 4 is the reference's effective batch 16
    gradient_checkpointing: bool = True  # recompute UNet layers in backward instead of keeping their activations
    loss_scaling: bool = True   # dynamic loss scaling when the model runs in float16 (off only as a test control)


def trainable_clones(model, clip, gradient_checkpointing: bool = True):
    """Clones whose forward passes can be differentiated w.r.t. their inputs: weights loaded as inference tensors
    are copied at use, CLIP layers add out of place, and (optionally) UNet layers are checkpointed
    (perfusion_ops/host.py). All of it lives on the clones."""
    train_model = model.clone()
    train_clip = clip.clone()
    for patcher in (train_model, train_clip.patcher):
        host.copy_inference_weights_at_use(patcher)
    host.make_clip_differentiable(train_clip.patcher)
    if gradient_checkpointing:
        host.checkpoint_unet_blocks(train_model)
    return train_model, train_clip


class _Photos:
    """The training latents (and their mirror images) with their loss weights, drawn in batches."""

    def __init__(self, unet, latents, masks, flipped_latents, flipped_masks):
        self.latents = unet.process_latent_in(latents.clone().float())
        self.flipped_latents = None if flipped_latents is None else unet.process_latent_in(flipped_latents.clone().float())
        self.weights = _latent_masks(masks, self.latents.shape)
        self.flipped_weights = self.weights if flipped_masks is None else _latent_masks(flipped_masks, self.latents.shape)

    def batch(self, size: int, flip: bool, generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(self.latents.shape[0], (size,), generator=generator).tolist()
        mirrored = ((torch.rand(size, generator=generator) < 0.5) & flip & (self.flipped_latents is not None)).tolist()
        x0 = torch.stack([(self.flipped_latents if m else self.latents)[i] for i, m in zip(index, mirrored)])
        weight = torch.stack([(self.flipped_weights if m else self.weights)[i] for i, m in zip(index, mirrored)])
        return x0, weight


def _encode_prompts(concept_clip, plain_clip, templates, name, superclass, super_encoded: dict):
    """Contexts of the concept prompts (with grad to the word vectors) and the mean encodings, at the
    concept's position, of the concept and of the superclass in the same templates. The superclass's encoding
    in a template never changes (its CLIP is frozen), so it is computed once and kept in `super_encoded`."""
    contexts, pooled, concept_encodings, super_encodings = [], [], [], []
    for template in templates:
        context, pool, positions = host.encode_with_grad(concept_clip, template.format(f"embedding:{name}"))
        if template not in super_encoded:
            with torch.no_grad():
                super_encoded[template] = host.encode_with_grad(plain_clip, template.format(superclass))[0][0, positions[0]]
        contexts.append(context)
        pooled.append(pool)
        concept_encodings.append(context[0, positions[0]].detach())
        super_encodings.append(super_encoded[template])
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


class _Training:
    """One training run on loaded clones: the learned tensors (float32, whatever the model's dtype), the running
    i* and i_super, the optimizer and the loss scale. `step()` is one optimizer step over
    `settings.gradient_accumulation` micro-batches."""

    def __init__(self, train_model, train_clip, photos, name, superclass, arch, token_ids, C_inv, covariance_id,
                 settings: TrainSettings, initial: Concept | None = None):
        self.unet = train_model.model
        self.sampling = train_model.get_model_object("model_sampling")
        self.device = train_model.load_device
        self.dtype = host.unet_compute_dtype(self.unet)
        self.layers = cross_attention_layers(self.unet.diffusion_model)
        self.train_clip, self.photos = train_clip, photos
        self.name, self.superclass, self.arch, self.settings = name, superclass, arch, settings
        self.C_inv, self.covariance_id = C_inv, covariance_id
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.rng = random.Random(settings.seed)
        self.loss_scale = loss_scale_for(self.dtype, settings.loss_scaling)
        if initial is None:
            self.embeddings = {encoder: torch.nn.Parameter(_word_embedding(train_clip, encoder, token).float()[None])
                               for encoder, token in token_ids.items()}
        else:  # resume: continue the file's word vectors; its values, keys and i*, i_super follow below
            self.embeddings = {encoder: torch.nn.Parameter(initial.embeddings[encoder].float().clone())
                               for encoder in token_ids}
        self.concept_clip = clip_with_word_vectors(train_clip, {name: self.embeddings})
        self.super_encoded = {}  # template -> the superclass's encoding at the concept's position (_encode_prompts)
        with torch.no_grad():
            if initial is not None:
                self.i_super, self.i_star = initial.i_super.double(), initial.i_star.double()
                self.values = {path: torch.nn.Parameter(initial.values[path].float().clone()) for path in self.layers}
                self.keys = {path: torch.nn.Parameter(initial.keys[path].float().clone() if path in initial.keys
                                                      else self._project(attn.to_k, self.i_super))
                             for path, attn in self.layers.items()} if settings.train_keys else {}
            else:
                # i* and i_super start at the superclass's own encoding (the reference starts from it too), and so
                # do the value targets (o*_V = W_v i_super) and, when learned, the key targets (where locking would
                # keep them). The word vector starts as the superclass's, so the concept's prompts give its positions.
                self.i_super = _encode_prompts(self.concept_clip, train_clip, TEMPLATES, name, superclass,
                                               self.super_encoded)[3]
                self.i_star = self.i_super.clone()
                self.values = {path: torch.nn.Parameter(self._project(attn.to_v, self.i_super))
                               for path, attn in self.layers.items()}
                self.keys = {path: torch.nn.Parameter(self._project(attn.to_k, self.i_super))
                             for path, attn in self.layers.items()} if settings.train_keys else {}
        groups = [{"params": list(self.embeddings.values()), "lr": settings.embedding_lr}]
        if settings.train_values:
            groups.append({"params": list(self.values.values()), "lr": settings.value_lr})
        if settings.train_keys:
            groups.append({"params": list(self.keys.values()), "lr": settings.value_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
        self.params = [p for group in groups for p in group["params"]]

    def _project(self, linear, vector: torch.Tensor) -> torch.Tensor:
        """linear(vector) through the live layer, in the dtype the UNet computes in, as a float32 vector."""
        return linear(vector.to(self.device, self.dtype)[None, None])[0, 0].float()

    def _micro_batch(self):
        """Loss, float32 gradients (of the loss divided by the accumulation count) and x0 prediction of one
        micro-batch; i* and i_super move once per micro-batch, as in the reference."""
        settings = self.settings
        x0, weight = self.photos.batch(settings.batch_size, settings.flip, self.generator)
        templates = [self.rng.choice(TEMPLATES) for _ in range(settings.batch_size)]
        context, pooled, concept_mean, super_mean = _encode_prompts(self.concept_clip, self.train_clip, templates,
                                                                    self.name, self.superclass, self.super_encoded)
        self.i_star = settings.ema * self.i_star + (1 - settings.ema) * concept_mean
        self.i_super = settings.ema * self.i_super + (1 - settings.ema) * super_mean
        tensors = None  # textual inversion: the word vector alone, no edit
        if settings.train_values or settings.train_keys:
            concept = _concept(self.name, self.superclass, self.arch, self.embeddings, self.i_star,
                               metric_vector(self.C_inv, self.i_star), self.i_super, self.values,
                               self.covariance_id, settings, [], keys=self.keys)
            tensors = ConceptTensors([AppliedConcept(concept, 1.0, settings.beta, settings.tau)], True, self.device)
        with hooks_installed(self.layers, tensors):
            loss, x0_prediction = _denoising_loss(self.unet, self.sampling, x0, weight, context.to(self.device),
                                                  pooled, self.generator)
            scaled = self.loss_scale.scaled(loss / settings.gradient_accumulation)
            grads = torch.autograd.grad(scaled, self.params)
        return loss.detach().item(), self.loss_scale.unscaled(grads), x0_prediction.detach()

    def step(self) -> tuple[float, torch.Tensor]:
        """One optimizer step; returns the mean micro-batch loss and the last x0 prediction. A step whose
        gradients overflowed (float16) is skipped and the loss scale lowered."""
        total, losses = None, []
        for _ in range(self.settings.gradient_accumulation):
            loss, grads, x0_prediction = self._micro_batch()
            losses.append(loss)
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
        if self.loss_scale.update(total):
            for param, grad in zip(self.params, total):
                param.grad = grad
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), x0_prediction

    def word_encoding(self, templates) -> torch.Tensor:
        """The concept word's current encoding at its position, averaged over `templates` (no gradient)."""
        encodings = []
        with torch.no_grad():
            for template in templates:
                context, _, positions = host.encode_with_grad(self.concept_clip, template.format(f"embedding:{self.name}"))
                encodings.append(context[0, positions[0]])
        return torch.stack(encodings).mean(0).double().cpu()

    def finished_gate(self) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """i*, u = C⁻¹ i* and r of the finished word in each prompt it was not trained on (GATE_CHECK_PROMPTS).

        i* is the finished word's own mean encoding over the training templates, not the moving average of
        training: the average lags a word vector that still moved near the end, which puts the word's gate
        input r far from 1 and leaves the β/τ knob idle (docs/method.md §5)."""
        i_star = self.word_encoding(TEMPLATES).float()
        u = metric_vector(self.C_inv, i_star)
        return i_star, u, [own_gate_input(self.word_encoding([prompt]), i_star, u) for prompt in GATE_CHECK_PROMPTS]

    def concept(self, losses: list[float], record: dict) -> tuple[Concept, list[float]]:
        """The concept as learned so far (what the file stores: i* and u of the word as it is now), and its
        word's gate input in each of GATE_CHECK_PROMPTS."""
        i_star, u, gate_inputs = self.finished_gate()
        concept = _concept(self.name, self.superclass, self.arch, self.embeddings, i_star, u, self.i_super.float(),
                           self.values, self.covariance_id, self.settings, losses, detach=True, keys=self.keys,
                           record={"gate_input": sum(gate_inputs) / len(gate_inputs), **record})
        return concept, gate_inputs


def train_concept(model, clip, latents, name: str, superclass: str, covariance: torch.Tensor, covariance_id: str,
                  settings: TrainSettings = TrainSettings(), masks=None, flipped_latents=None, flipped_masks=None,
                  on_step=None, on_status=None, initial: Concept | None = None, every_n_steps=(),
                  on_cancel=None) -> tuple[Concept, list[float]]:
    """Learn a concept from `latents` [N, 4, h, w] (VAE output) and optional soft `masks` [N, h, w].

    `on_step(step, loss, x0_prediction)` is called after every step (progress, previews, cancel);
    `on_status(text)` once, with the precision training runs in. `initial`: a concept to continue (its word
    vectors, value and key targets, i* and i_super; the optimizer starts afresh). `every_n_steps` holds pairs
    (n, callback): every n steps (n > 0) `callback(steps, concept)` gets the concept as it is (snapshots,
    validation renders; a callback may load other models, the training's are loaded back after it); when the run
    is cancelled (ComfyUI's interrupt),
    `on_cancel(steps, concept)` gets what was learned so far, and the interruption goes on. The concept records
    `steps_done`, counted across resumed runs.
    With `settings.train_values` off only the word vectors are learned (textual inversion, a baseline);
    with `settings.train_keys` on the key targets are learned too instead of locked (an ablation).
    """
    import comfy.model_management as mm
    arch, token_ids = _checked_setup(model, clip, superclass, settings)
    if initial is not None:
        check_resumable(initial, model, arch, settings)
    setup = clip_setup(clip)  # recorded, so that applying the concept with another setup warns
    C_inv = inverse(covariance)
    train_model, train_clip = trainable_clones(model, clip, settings.gradient_checkpointing)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # No force_full_load: ComfyUI may load the UNet partially (lowvram) and cast weights at use.
            mm.load_models_gpu([train_model, train_clip.patcher])
            photos = _Photos(train_model.model, latents, masks, flipped_latents, flipped_masks)
            run = _Training(train_model, train_clip, photos, name, superclass, arch, token_ids, C_inv,
                            covariance_id, settings, initial)
            precision = describe(run.dtype, run.loss_scale)
            log.info("Perfusion training '%s': %s", name, precision)
            if on_status is not None:
                on_status(precision)
            losses = []
            record = {"precision": precision, "clip_setup": setup}
            done_before = 0 if initial is None else int(json.loads(initial.train or "{}").get("steps_done") or 0)
            if initial is not None:
                record["resumed_after_steps"] = done_before
            try:
                for step in range(settings.steps):
                    loss, x0_prediction = run.step()
                    losses.append(loss)
                    if on_step is not None:
                        on_step(step, loss, x0_prediction)
                    due = [callback for every, callback in every_n_steps if every > 0 and (step + 1) % every == 0]
                    if due:
                        snapshot = run.concept(losses, {**record, "steps_done": done_before + step + 1})[0]
                        for callback in due:
                            callback(step + 1, snapshot)
                        mm.load_models_gpu([train_model, train_clip.patcher])  # back, if a callback swapped them out
            except mm.InterruptProcessingException:
                if on_cancel is not None and losses:
                    on_cancel(len(losses), run.concept(losses, {**record, "steps_done": done_before + len(losses),
                                                                "cancelled": True})[0])
                raise
            final, gate_inputs = run.concept(losses, {**record, "steps_done": done_before + settings.steps})
        _check_gate_input(name, json.loads(final.train)["gate_input"], gate_inputs)
        if run.loss_scale.skipped:
            log.info("Perfusion training '%s': %d of %d steps skipped for float16 overflow (loss scale now %g)",
                     name, run.loss_scale.skipped, settings.steps, run.loss_scale.scale)
        return final, losses
    finally:
        host.unload(train_model, train_clip.patcher)


def _checked_setup(model, clip, superclass: str, settings: TrainSettings) -> tuple[str, dict[str, int]]:
    """The architecture and the superclass's token ids, or a PerfusionError saying what does not fit."""
    arch = model_architecture(model)
    if clip_architecture(clip) != arch:
        raise PerfusionError(f"The CLIP ({clip_architecture(clip).upper()}) does not belong to this model ({arch.upper()}).")
    if settings.gradient_accumulation < 1 or settings.batch_size < 1:
        raise PerfusionError("batch_size and gradient_accumulation must be at least 1.")
    return arch, superclass_tokens(clip, superclass)


def check_resumable(initial: Concept, model, arch: str, settings: TrainSettings) -> None:
    """A concept to continue must fit this model (architecture, layers) and carry one word vector per encoder."""
    from .patch import check_concept_fits
    check_concept_fits(initial, model.model.diffusion_model, arch)
    for encoder, vectors in initial.embeddings.items():
        if vectors.shape[0] != 1:
            raise PerfusionError(f"Concept '{initial.name}' has {vectors.shape[0]} word vectors for {encoder}; "
                                 "training continues a concept with one.")


def own_gate_input(encoding: torch.Tensor, i_star: torch.Tensor, u: torch.Tensor) -> float:
    """r = uᵀx / uᵀi* for x = the concept word's own encoding: the gate input it gets at inference."""
    encoding, i_star, u = encoding.double().cpu(), i_star.double().cpu(), u.double().cpu()
    return float(u @ encoding / (u @ i_star))


def _check_gate_input(name: str, r: float, per_prompt: list[float]) -> None:
    """The gate σ((r − β)/τ) is built for r ≈ 1 on the concept's own word. i* is the finished word's mean encoding
    over the training templates, so r is 1 on average there; in other prompts the word's encoding moves with its
    context, and the C⁻¹ metric weighs such moves heavily. When r is far from 1 in prompts the concept was not
    trained on, the gate is shut (r below β) or saturated (r well above 1) there, and β/τ barely act."""
    opening = gate(torch.tensor(r), INFERENCE_BETA, INFERENCE_TAU).item()
    log.info("Perfusion: '%s' gate input on its own word in new prompts r = %.2f (%.2f to %.2f; gate %.2f at beta "
             "%.2f, tau %.2f)", name, r, min(per_prompt), max(per_prompt), opening, INFERENCE_BETA, INFERENCE_TAU)
    if abs(r - 1.0) > GATE_INPUT_TOLERANCE:
        log.warning("Perfusion: '%s' has gate input r = %.2f on its own word in prompts it was not trained on, far "
                    "from 1, so beta and tau will barely change it there. Train with more varied photos, or lower "
                    "embedding_lr.", name, r)


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
             detach=False, keys=None, record=None) -> Concept:
    """The concept (detached: the finished one, with the settings and `record` of the run in its `train` JSON)."""
    take = (lambda t: t.detach().float().cpu().clone()) if detach else (lambda t: t)
    return Concept(
        name=name, superclass=superclass, arch=arch,
        embeddings={encoder: take(vector) for encoder, vector in embeddings.items()},
        i_star=i_star.float(), u=u.float(), i_super=i_super.float(),
        values={path: take(v) for path, v in values.items()},
        keys={path: take(k) for path, k in (keys or {}).items()},
        beta=INFERENCE_BETA, tau=INFERENCE_TAU, covariance=covariance_id,
        train=json.dumps({**asdict(settings), "final_loss": losses[-1] if losses else None, **(record or {})})
        if detach else "{}")
