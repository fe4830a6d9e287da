"""Load the training photos (and their masks) from a folder in ComfyUI's input directory."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..perfusion_ops.photos import DEFAULT_FIT, FITS, MASK_FOLDER, load_photo_folder
from .common import CATEGORY, with_search_aliases


class PerfusionLoadPhotos(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PerfusionLoadPhotos",
            **with_search_aliases(["personalize", "concept", "dataset", "training images", "image folder"]),
            display_name="Perfusion Load Photos",
            category=f"{CATEGORY}/train",
            description="The photos of a concept from a folder in ComfyUI/input, as square images for Perfusion "
                        f"Train Concept, with their masks from its '{MASK_FOLDER}' subfolder when there is one.",
            inputs=[
                io.Combo.Input("folder", options=[f for f in folder_paths.get_input_subfolders()
                                                  if os.path.basename(f) != MASK_FOLDER],
                               tooltip="A folder in ComfyUI/input with 3-10 photos of the concept. Optional masks "
                                       f"(white = the concept) go in its '{MASK_FOLDER}' subfolder under the same "
                                       "file names."),
                io.Int.Input("size", default=512, min=64, max=2048, step=64,
                             tooltip="Side of the square images (512 for SD1.x/SD2.x, 1024 for SDXL)."),
                io.Combo.Input("fit", options=list(FITS), default=DEFAULT_FIT,
                               tooltip="crop: the largest centred square (default). pad: the whole photo on a grey "
                                       "border, which the mask leaves out of training. squash: the whole photo "
                                       "stretched to a square."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The photos, size x size."),
                     io.Mask.Output(display_name="masks", tooltip="Their masks; all white (except any padding) "
                                                                  "when the folder has none.")],
        )

    @classmethod
    def execute(cls, folder, size=512, fit=DEFAULT_FIT) -> io.NodeOutput:
        path = os.path.join(folder_paths.get_input_directory(), folder)
        images, masks, with_masks = load_photo_folder(path, size, fit)
        text = f"{images.shape[0]} photos from input/{folder}, {'with' if with_masks else 'without'} masks"
        return io.NodeOutput(images, masks, ui={"text": [text]})
