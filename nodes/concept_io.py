"""Load and save concept files (models/perfusion/*.safetensors)."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..perfusion_ops.concept import ConceptSet
from ..perfusion_ops.concept_file import read_concept
from .common import CATEGORY, CONCEPT_FOLDER, PerfusionConcept, save_concept, with_search_aliases


class PerfusionLoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PerfusionLoadConcept",
            **with_search_aliases(["personalize", "concept", "textual inversion", "dreambooth", "embedding"]),
            display_name="Perfusion Load Concept",
            category=f"{CATEGORY}/io",
            description="Loads a Perfusion concept file from models/perfusion. Write the concept in a prompt as "
                        "embedding:<name> after applying it with Perfusion Apply Concept.",
            inputs=[io.Combo.Input("concept_name", options=folder_paths.get_filename_list(CONCEPT_FOLDER),
                                   tooltip="A concept file in models/perfusion (.safetensors).")],
            outputs=[PerfusionConcept.Output(display_name="concept",
                                             tooltip="The concept, ready for Perfusion Apply Concept or Combine.")],
        )

    @classmethod
    def fingerprint_inputs(cls, concept_name):
        path = folder_paths.get_full_path(CONCEPT_FOLDER, concept_name)
        return (concept_name, os.path.getmtime(path)) if path else concept_name

    @classmethod
    def execute(cls, concept_name) -> io.NodeOutput:
        if concept_name not in folder_paths.get_filename_list(CONCEPT_FOLDER):
            raise ValueError(f"'{concept_name}' is not a concept file in models/perfusion (.safetensors).")
        path = folder_paths.get_full_path_or_raise(CONCEPT_FOLDER, concept_name)
        concept = read_concept(path)
        info = f"{concept.name} ({concept.arch}, superclass '{concept.superclass}', " \
               f"recommended beta {concept.beta:g}, tau {concept.tau:g})"
        return io.NodeOutput(ConceptSet((concept,)), ui={"text": [info]})


class PerfusionSaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PerfusionSaveConcept",
            **with_search_aliases(["personalize", "concept", "textual inversion", "dreambooth", "embedding"]),
            display_name="Perfusion Save Concept",
            category=f"{CATEGORY}/io",
            description="Saves a concept (or each concept of a set) as a small .safetensors file in models/perfusion.",
            inputs=[
                PerfusionConcept.Input("concept", tooltip="The concept to save, e.g. from Perfusion Train Concept."),
                io.String.Input("filename_prefix", default="{name}",
                                tooltip="File name inside models/perfusion (sub-folders allowed); {name} becomes the "
                                        "concept's name, and a counter and .safetensors are added."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, concept: ConceptSet, filename_prefix: str) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths(CONCEPT_FOLDER)[0]
        saved = []
        for c in concept.concepts:
            prefix = filename_prefix if "{name}" in filename_prefix or len(concept.concepts) == 1 \
                else filename_prefix + "_{name}"  # one file per concept of a set
            prefix = prefix.replace("{name}", c.name)
            path = save_concept(c, folder, prefix)
            saved.append(os.path.relpath(path, folder))
        return io.NodeOutput(ui={"text": saved})
