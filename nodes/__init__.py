"""The pack's ComfyUI nodes (V3 API). Thin: each one validates its inputs and calls perfusion_ops."""
from comfy_api.latest import ComfyExtension, io

from .apply import PerfusionApplyConcept
from .combine import PerfusionCombineConcepts
from .common import register_concept_folder
from .concept_io import PerfusionLoadConcept, PerfusionSaveConcept
from .photos import PerfusionLoadPhotos
from .sweep import PerfusionGateSweep
from .train import PerfusionTrainConcept

register_concept_folder()

NODES = [PerfusionLoadPhotos, PerfusionTrainConcept, PerfusionLoadConcept, PerfusionSaveConcept, PerfusionApplyConcept,
         PerfusionCombineConcepts, PerfusionGateSweep]


class PerfusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
