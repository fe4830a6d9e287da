"""Train a concept inside the graph."""
from __future__ import annotations

import json
import logging

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from comfy_api.latest import ui

from ..perfusion_ops.concept import ARCHITECTURES, ConceptSet, is_valid_name
from ..perfusion_ops.covariance import cached_covariance, load_covariance_file
from ..perfusion_ops.host import show_text_on_node
from ..perfusion_ops.photos import DEFAULT_FIT, FITS, fit_batch
from ..perfusion_ops.patch import apply_concepts, model_architecture
from ..perfusion_ops.text import clip_with_concepts
from ..perfusion_ops.train import TrainSettings, train_concept
from .common import (CATEGORY, CONCEPT_FOLDER, COVARIANCE_FOLDER, PerfusionConcept, advanced, save_concept,
                     with_search_aliases)
from .images import captioned
from .render import empty_latent, encode, preview, render

ESTIMATE = "estimate from this CLIP"
DEFAULT = TrainSettings()  # every training default of the node is the recipe's own
RESOLUTION = 512           # photos' side before encoding: SD1.x/SD2.x's training size (SDXL users pick 1024)
PREVIEW_EVERY = 0          # no previews unless asked for
SAVE_EVERY = 0             # no snapshots unless asked for
SAVE_ON_CANCEL = True      # a cancelled run keeps what it learned, under a name that says so
VALIDATE_EVERY = 0         # validation renders only at the end unless asked for
VALIDATION_STEPS = 12      # a few sampler steps: enough to see the concept, cheap next to the training
VALIDATION_CFG = 7.0       # the KSampler default; with the sampler and scheduler below, what a user first renders with
VALIDATION_SAMPLER, VALIDATION_SCHEDULER = "euler", "normal"
log = logging.getLogger(__name__)


class PerfusionTrainConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PerfusionTrainConcept",
            **with_search_aliases(["personalize", "concept", "textual inversion", "dreambooth", "train",
                                   "fine-tune"]),
            display_name="Perfusion Train Concept",
            category=f"{CATEGORY}/train",
            description="Learns a new concept from a few photos: its word vector(s) and one value target per "
                        "cross-attention layer, with keys locked to the superclass. Save it with Perfusion Save "
                        "Concept; use it with Perfusion Apply Concept and embedding:<name> in prompts.",
            inputs=[
                io.Model.Input("model", tooltip="The model to personalise (SD1.x, SD2.x or SDXL). It is not changed."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint (its clip-skip setting is used)."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint, to encode the photos."),
                io.Image.Input("images", tooltip="3-10 photos of the concept (a batch; use 'Batch Images' or a folder loader)."),
                io.String.Input("name", default="my_concept",
                                tooltip="The word for prompts: embedding:<name>. One word, no spaces."),
                io.String.Input("superclass", default="teddy",
                                tooltip="One common word for what the concept is (teddy, cat, pot, sculpture). "
                                        "Its key is where the concept goes in the image."),
                io.Int.Input("steps", default=DEFAULT.steps, min=1, max=100000, tooltip="Optimisation steps (reference: 400)."),
                io.Int.Input("seed", default=DEFAULT.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Same seed, same inputs: same concept."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional soft masks of the concept, one per photo; the loss is weighted by them."),
                io.Int.Input("batch_size", default=DEFAULT.batch_size, min=1, max=64, optional=True,
                             tooltip="Photos per micro-batch (reference: 4)."),
                io.Int.Input("resolution", default=RESOLUTION, min=0, max=2048, step=64, optional=True,
                             tooltip="Photos are made square at this size before encoding (512 for SD1.x/SD2.x, "
                                     "1024 for SDXL); 0 keeps their scale."),
                io.Combo.Input("fit", options=list(FITS), default=DEFAULT_FIT, optional=True,
                               tooltip="How photos that are not square become square. crop: the largest centred "
                                       "square (keeps the aspect). pad: the whole photo on a grey border, left out "
                                       "of the loss. squash: stretched (the reference recipe)."),
                advanced(io.Float.Input(
                    "value_lr", default=DEFAULT.value_lr, min=0.0, max=1.0, step=0.001, optional=True,
                    tooltip="Learning rate of the value targets (reference: 0.03).")),
                advanced(io.Float.Input(
                    "embedding_lr", default=DEFAULT.embedding_lr, min=0.0, max=1.0, step=0.0001, optional=True,
                    tooltip="Learning rate of the word vector (reference: 0.006).")),
                advanced(io.Float.Input(
                    "train_beta", default=DEFAULT.beta, min=-1.0, max=2.0, step=0.01, optional=True,
                    tooltip="Gate bias while training (reference: 0.75).")),
                advanced(io.Float.Input(
                    "train_tau", default=DEFAULT.tau, min=0.01, max=1.0, step=0.01, optional=True,
                    tooltip="Gate temperature while training (reference: 0.10).")),
                io.Boolean.Input("flip", default=DEFAULT.flip, optional=True,
                                 tooltip="Randomly mirror photos (turn off for asymmetric concepts, e.g. with text)."),
                advanced(io.Combo.Input(
                    "covariance", options=[ESTIMATE] + folder_paths.get_filename_list(COVARIANCE_FOLDER),
                    default=ESTIMATE, optional=True,
                    tooltip="The text-encoder covariance C: estimated once per CLIP setup from the pack's caption "
                            "corpus and cached, or a file (key 'covariance') from models/perfusion_covariance.")),
                io.Int.Input("preview_every", default=PREVIEW_EVERY, min=0, max=10000, optional=True,
                             tooltip="Show a preview of the model's denoised guess every N steps (0: no previews)."),
                advanced(io.Boolean.Input(
                    "train_values", default=DEFAULT.train_values, optional=True,
                    tooltip="Learn the value targets (Perfusion). Off: learn only the word vector, i.e. textual "
                            "inversion, a baseline; apply it with strength 0.")),
                advanced(io.Boolean.Input(
                    "train_keys", default=DEFAULT.train_keys, optional=True,
                    tooltip="Also learn the key targets instead of locking them to the superclass (an ablation of "
                            "key-locking; the paper's default is off).")),
                io.Int.Input("gradient_accumulation", default=DEFAULT.gradient_accumulation, min=1, max=64,
                             optional=True,
                             tooltip="Micro-batches per optimisation step: the step sees batch_size x this many "
                                     "photos (reference: 4 x 4 = 16). Memory stays that of one micro-batch."),
                io.Int.Input("save_every", default=SAVE_EVERY, min=0, max=100000, optional=True,
                             tooltip="Save a snapshot of the concept every N steps, to pick the best one later: "
                                     "models/perfusion/<name>_snapshots/<name>_step<N>_00001.safetensors "
                                     "(0: no snapshots)."),
                io.Boolean.Input("save_on_cancel", default=SAVE_ON_CANCEL, optional=True,
                                 tooltip="When the run is cancelled, save what was learned so far as "
                                         "models/perfusion/<name>_snapshots/<name>_cancelled_step<N>_00001.safetensors "
                                         "(never under the final name)."),
                io.String.Input("validation_prompt", default="", optional=True,
                                tooltip="A prompt to render with the concept as it is while it trains, e.g. 'a photo "
                                        "of embedding:my_concept on a beach' (empty: no renders). The renders use "
                                        "the training seed, the photos' size, euler/normal, cfg 7 and the concept's "
                                        "recommended beta/tau; each shows on the node as it is made and all come "
                                        "out of 'validation', captioned with their step."),
                io.Int.Input("validate_every", default=VALIDATE_EVERY, min=0, max=100000, optional=True,
                             tooltip="Render the validation prompt every N steps, and at the end (0: only at the end)."),
                io.Int.Input("validation_steps", default=VALIDATION_STEPS, min=1, max=100, optional=True,
                             tooltip="Sampler steps of each validation render."),
                PerfusionConcept.Input("resume_from", optional=True,
                                       tooltip="A concept to continue training (e.g. a snapshot from Load Concept): "
                                               "its word vector, values and i* are the start. The optimizer starts "
                                               "afresh; steps counts the new steps."),
                io.Boolean.Input("gradient_checkpointing", default=DEFAULT.gradient_checkpointing, optional=True,
                                 tooltip="Recompute the UNet's layers during the backward pass instead of keeping "
                                         "their activations: a fraction of the memory (SDXL: about a third), up to twice the time "
                                         "per step."),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[PerfusionConcept.Output(display_name="concept", tooltip="The trained concept."),
                     io.LossMap.Output(display_name="loss", tooltip="Loss per step, for 'Plot Loss Graph'."),
                     io.Image.Output(display_name="validation",
                                     tooltip="The validation renders in order, each captioned with its step (an empty "
                                             "batch without a validation prompt).")],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, name, superclass, steps, seed, masks=None,
                batch_size=DEFAULT.batch_size, resolution=RESOLUTION, value_lr=DEFAULT.value_lr,
                embedding_lr=DEFAULT.embedding_lr, train_beta=DEFAULT.beta, train_tau=DEFAULT.tau, flip=DEFAULT.flip,
                covariance=ESTIMATE, preview_every=PREVIEW_EVERY, train_values=DEFAULT.train_values,
                train_keys=DEFAULT.train_keys, gradient_accumulation=DEFAULT.gradient_accumulation,
                gradient_checkpointing=DEFAULT.gradient_checkpointing, fit=DEFAULT_FIT, save_every=SAVE_EVERY,
                save_on_cancel=SAVE_ON_CANCEL, resume_from: ConceptSet | None = None, validation_prompt="",
                validate_every=VALIDATE_EVERY, validation_steps=VALIDATION_STEPS) -> io.NodeOutput:
        name = name.strip()
        if not is_valid_name(name):
            raise ValueError(f"name must be one word of letters, digits, '_', '-' or '.' (it is written "
                             f"embedding:<name>), got '{name}'.")
        if images is None or images.shape[0] == 0:
            raise ValueError("No images: connect a batch of photos of the concept.")
        if masks is not None:
            if masks.ndim == 2:
                masks = masks[None]
            if masks.shape[0] != images.shape[0]:
                raise ValueError(f"{masks.shape[0]} masks for {images.shape[0]} images: give one mask per image.")
        arch = model_architecture(model)
        context_dim = ARCHITECTURES[arch]["context_dim"]
        if resume_from is not None and len(resume_from.concepts) != 1:
            raise ValueError(f"resume_from holds {len(resume_from.concepts)} concepts; connect one concept to continue.")

        if masks is not None and masks.shape[1:] != images.shape[1:3]:
            raise ValueError(f"The masks are {masks.shape[2]}x{masks.shape[1]} and the photos "
                             f"{images.shape[2]}x{images.shape[1]}: give masks of the photos' size.")
        pixels, masks = fit_batch(images[..., :3], masks, resolution, fit)
        latents = vae.encode(pixels)
        flipped_latents = vae.encode(torch.flip(pixels, dims=[2])) if flip else None
        flipped_masks = torch.flip(masks, dims=[2]) if (flip and masks is not None) else None

        if covariance == ESTIMATE:
            cache = folder_paths.get_folder_paths(COVARIANCE_FOLDER)[0]
            estimating = comfy.utils.ProgressBar(1)  # only advances when C is not in the cache yet
            C, covariance_id = cached_covariance(clip, cache, lambda done, total: estimating.update_absolute(done, total))
        else:
            C, covariance_id = load_covariance_file(folder_paths.get_full_path_or_raise(COVARIANCE_FOLDER, covariance),
                                                    context_dim)
        progress = comfy.utils.ProgressBar(steps)
        previewer = None
        if preview_every > 0:
            import latent_preview
            previewer = latent_preview.get_previewer(comfy.model_management.get_torch_device(),
                                                     model.model.latent_format)

        def on_step(step, loss, x0_prediction):
            comfy.model_management.throw_exception_if_processing_interrupted()
            preview = None
            if previewer is not None and (step + 1) % preview_every == 0:
                preview = previewer.decode_latent_to_preview_image("JPEG", x0_prediction[:1])
            progress.update_absolute(step + 1, steps, preview)
            show_text_on_node(f"step {step + 1}/{steps}, loss {loss:.4f}", cls.hidden.unique_id)
            if (step + 1) % max(1, steps // 10) == 0:
                log.info("Perfusion training '%s': step %d/%d, loss %.5f", name, step + 1, steps, loss)

        settings = TrainSettings(steps=steps, seed=seed, batch_size=batch_size, value_lr=value_lr,
                                 embedding_lr=embedding_lr, beta=train_beta, tau=train_tau, flip=flip,
                                 train_values=train_values, train_keys=train_keys,
                                 gradient_accumulation=gradient_accumulation,
                                 gradient_checkpointing=gradient_checkpointing)
        concept_folder = folder_paths.get_folder_paths(CONCEPT_FOLDER)[0]

        def save_snapshot(kind):
            def save(steps_done, snapshot):
                path = save_concept(snapshot, concept_folder, f"{name}_snapshots/{name}_{kind}{steps_done:05d}")
                log.info("Perfusion training '%s': %s saved to %s", name, kind.rstrip("_"), path)
            return save

        validation_prompt = validation_prompt.strip()
        if validation_prompt and f"embedding:{name}" not in validation_prompt:
            log.warning("Perfusion training '%s': the validation prompt does not say embedding:%s, so its renders "
                        "will not show the concept.", name, name)
        renders = []

        def validate(steps_done, snapshot):
            concept_clip = clip_with_concepts(clip, [snapshot])
            image = render(apply_concepts(model, [snapshot]), vae, encode(concept_clip, validation_prompt),
                           encode(concept_clip, ""), empty_latent(pixels.shape[2], pixels.shape[1]), seed,
                           validation_steps, VALIDATION_CFG, VALIDATION_SAMPLER, VALIDATION_SCHEDULER)[0]
            renders.append(captioned(image, f"step {steps_done}"))
            progress.update_absolute(min(steps_done, steps), steps, preview(image))

        every_n_steps = [(save_every, save_snapshot("step"))]
        if validation_prompt:
            every_n_steps.append((validate_every, validate))
        concept, losses = train_concept(
            model, clip, latents, name, superclass, C, covariance_id, settings, masks=masks,
            flipped_latents=flipped_latents, flipped_masks=flipped_masks, on_step=on_step,
            on_status=lambda text: show_text_on_node(f"training: {text}", cls.hidden.unique_id),
            initial=None if resume_from is None else resume_from.concepts[0], every_n_steps=every_n_steps,
            on_cancel=save_snapshot("cancelled_step") if save_on_cancel else None)
        if validation_prompt and (validate_every == 0 or steps % validate_every != 0):
            validate(steps, concept)
        precision = json.loads(concept.train)["precision"]  # what training recorded in the concept
        summary = f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps; {precision}"
        shown = {"text": [summary]}
        validation = torch.stack(renders) if renders else torch.zeros(0, pixels.shape[1], pixels.shape[2], 3)
        if renders:
            shown.update(ui.PreviewImage(validation, cls=cls).as_dict())
        return io.NodeOutput(ConceptSet((concept,)), {"loss": losses}, validation, ui=shown)
