"""Every ComfyUI internal the pack relies on, in one place.

The pack otherwise uses ComfyUI's public surface (ModelPatcher clones, wrappers and object patches, the V3
node API, folder_paths). What is below reaches further in: each item names what it relies on and the host
versions it was checked on, and `tests/test_host_internals.py` fails naming the item when a host changes it.
Checked on ComfyUI v0.3.64 (the minimum) and v0.33.0 (current).
"""
from __future__ import annotations

import copy
import types

import torch

# comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: the wrapper around one call of the diffusion model.
DIFFUSION_MODEL_WRAPPER = "diffusion_model"
# The text model's method comfy.sd.CLIP calls to encode tokens (an object patch on a CLIP's patcher replaces it
# for that clone while it is loaded, as object patches do on a UNet).
TEXT_ENCODE = "encode_token_weights"
# The model condition that carries global key-locking's key context from the text encoder to the diffusion model.
KEY_CONTEXT = "perfusion_key_context"


def with_key_context(encoded: tuple, key_context: torch.Tensor) -> tuple:
    """An encode_token_weights result (context, pooled[, extra dict]) whose conditioning will carry `key_context`
    into the diffusion model's keyword arguments, batched row for row with the context:
    comfy.sd.CLIP.encode_from_tokens copies the extra dict's entries into the conditioning dict (v0.33.0's
    clip-schedule branch, used only with CLIP hooks, drops them); comfy.sampler_helpers.convert_cond keeps a
    conditioning's 'model_conds'; comfy.samplers batches a comfy.conds.CONDCrossAttn exactly as it batches the
    prompt's context (the same repetition to a common length); BaseModel._apply_model casts it to the model's
    dtype and passes it to the diffusion model as a keyword argument."""
    import comfy.conds
    extra = dict(encoded[2]) if len(encoded) > 2 else {}
    extra["model_conds"] = {**extra.get("model_conds", {}), KEY_CONTEXT: comfy.conds.CONDCrossAttn(key_context)}
    return (encoded[0], encoded[1], extra)


def lookup_with_vectors(original, vectors: dict[str, torch.Tensor]):
    """An SDTokenizer._try_get_embedding that resolves the names in `vectors` and defers to `original` for others.

    The host's lookup returns (embedding, leftover) on v0.3.64 and (embedding, cleaned name, leftover) on v0.33.0.
    For one of our names the host's own lookup still runs and only the embedding it found (normally none) is
    replaced, so the tuple keeps the host's shape and its parsing of the rest (trailing commas, `<`/`[`
    suffixes) on every version.
    """

    def try_get_embedding(embedding_name: str):
        result = original(embedding_name)
        words = embedding_name.split()
        name = words[0].split("<")[0].split("[")[0].strip(",") if words else ""
        if name in vectors:
            return (vectors[name], *result[1:])
        return result
    return try_get_embedding


def install_embedding_lookup(tokenizer, vectors: dict[str, torch.Tensor]):
    """A shallow copy of one SDTokenizer (clip_l, clip_g, ...) whose `embedding:<name>` knows `vectors`."""
    copied = copy.copy(tokenizer)
    if copied.embedding_directory is None:
        copied.embedding_directory = []  # the tokenizer parses "embedding:" only when a directory is set
    # Taken from the copy: the class's lookup then reads the copy's directory list, and a lookup installed by an
    # earlier call (an instance attribute, copied along) is chained.
    copied._try_get_embedding = lookup_with_vectors(copied._try_get_embedding, vectors)
    return copied


def weights_as_loaded(patcher) -> dict[str, torch.Tensor]:
    """The model's weights as the checkpoint gave them, whether or not this or another clone has weight patches
    applied in place right now: ModelPatcher.backup (shared by clones) holds the originals of patched weights,
    as a namedtuple with `.weight`."""
    state = patcher.model.state_dict()
    for key, original in patcher.backup.items():
        if key in state:
            state[key] = original.weight
    return state


def weight_patch_strengths(patcher) -> list[tuple[str, list[tuple[float, float]]]]:
    """(weight name, [(strength_patch, strength_model), ...]) of every weight patch (a LoRA, for example) on
    this clone: ModelPatcher.patches maps a weight name to tuples (strength_patch, data, strength_model, ...)."""
    return sorted((key, [(float(p[0]), float(p[2])) for p in patches]) for key, patches in patcher.patches.items())


def unload(*patchers) -> None:
    """Unload these ModelPatchers now (comfy.model_management.current_loaded_models, LoadedModel.model_unload),
    so that the models ComfyUI loads next are not kept out of memory by training clones."""
    import comfy.model_management as mm
    for i in reversed(range(len(mm.current_loaded_models))):
        if mm.current_loaded_models[i].model in patchers:
            mm.current_loaded_models.pop(i).model_unload()


def _out_of_place_clip_layer(self, x, mask=None, optimized_attention=None):
    # comfy.clip_model.CLIPLayer.forward with `x = x + ...` instead of `x += ...`: autograd cannot go back
    # through the in-place additions.
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def make_clip_differentiable(clip_patcher) -> None:
    """Object patches on a CLIP's ModelPatcher clone that replace every comfy.clip_model.CLIPLayer.forward by
    an out-of-place copy of it (same math; the class is matched by name, its body is the one in v0.3.64 and
    v0.33.0)."""
    for name, module in clip_patcher.model.named_modules():
        if type(module).__name__ == "CLIPLayer":
            clip_patcher.add_object_patch(f"{name}.forward", types.MethodType(_out_of_place_clip_layer, module))


def copy_inference_weights_at_use(patcher) -> None:
    """Weight wrappers (ModelPatcher.add_weight_wrapper, read by comfy.ops through `weight_function`) that turn
    every weight loaded as an inference tensor into an ordinary tensor at use, so autograd may save it.
    Embedding tables are skipped: their backward never reads the table."""
    identity = lambda weight: weight  # noqa: E731  (the cast comfy.ops does before calling it makes the copy)
    for name, module in patcher.model.named_modules():
        if not hasattr(module, "weight_function") or isinstance(module, torch.nn.Embedding):
            continue
        for param in ("weight", "bias"):
            tensor = getattr(module, param, None)
            if tensor is not None and tensor.is_inference():
                patcher.add_weight_wrapper(f"{name}.{param}", identity)


def sample(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
           latent_image: torch.Tensor) -> torch.Tensor:
    """Denoised latents, as the KSampler node samples them (nodes.common_ksampler: the latent's channels fixed
    for the model, noise from the seed, comfy.sample.sample), without its progress bar, so that a render inside
    another node's work (a training's validation, a sweep's cells) leaves that node's bar alone."""
    import comfy.sample
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent_image)
    noise = comfy.sample.prepare_noise(latent_image, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               disable_pbar=True, seed=seed)


def show_text_on_node(text: str, node_id) -> None:
    """Text on a node in the editor (server.PromptServer.instance.send_progress_text); a no-op without a server."""
    try:
        from server import PromptServer
        PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):
        pass


def unet_compute_dtype(base_model) -> torch.dtype:
    """The dtype the diffusion model computes in: BaseModel.manual_cast_dtype when set, else the weights' dtype
    (what BaseModel.apply_model casts its inputs to; v0.33.0 names it get_dtype_inference)."""
    return base_model.manual_cast_dtype or base_model.get_dtype()


def checkpoint_unet_blocks(patcher) -> int:
    """Gradient checkpointing on a UNet's ModelPatcher clone: object patches that run every layer of every
    input, middle and output block (ResBlock, SpatialTransformer, ...) under torch.utils.checkpoint, so a
    backward pass keeps only the layers' inputs and recomputes the rest. The UNet calls those layers through
    comfy.ldm.modules.diffusionmodules.openaimodel.forward_timestep_embed, which calls each layer (so an
    instance `forward` is used); patching the block's own forward would do nothing. Returns how many layers."""
    import torch.utils.checkpoint
    count = 0
    for name, module in patcher.model.diffusion_model.named_modules():
        parts = name.split(".")
        in_block = (len(parts) == 3 and parts[0] in ("input_blocks", "output_blocks")) or \
                   (len(parts) == 2 and parts[0] == "middle_block")
        if not in_block or not any(True for _ in module.parameters()):
            continue

        def checkpointed(*args, _forward=module.forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        patcher.add_object_patch(f"diffusion_model.{name}.forward", checkpointed)
        count += 1
    return count


def encode_with_grad(clip, prompt: str):
    """Context, pooled output and the token positions that hold word vectors (not token ids), of `prompt`, through
    the CLIP's encoder directly, so that gradients reach the word vectors. What comfy.sd.CLIP.encode_from_tokens
    does inside (reset_clip_options, set_clip_options with the clip-skip layer, encode_token_weights), without
    its model loading and no-grad context."""
    tokens = clip.tokenize(prompt)
    clip.cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    context, pooled = clip.cond_stage_model.encode_token_weights(tokens)[:2]
    first_chunk = next(iter(tokens.values()))[0]
    positions = [i for i, item in enumerate(first_chunk) if not isinstance(item[0], int)]
    return context, pooled, positions
