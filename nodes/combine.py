"""Combine several concepts into one set."""
from __future__ import annotations

from comfy_api.latest import io

from ..perfusion_ops.concept import ConceptSet, check_used_together
from .common import CATEGORY, PerfusionConcept, with_search_aliases

MAX_INPUTS = 8


def combine(sets: list[ConceptSet]) -> ConceptSet:
    concepts = [c for s in sets for c in s.concepts]
    check_used_together(concepts, "appear more than once; each concept can be combined only once")
    return ConceptSet(tuple(concepts))


class PerfusionCombineConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        optional = [PerfusionConcept.Input(f"concept_{i}", optional=True, tooltip="Another concept (optional).")
                    for i in range(3, MAX_INPUTS + 1)]
        return io.Schema(
            node_id="PerfusionCombineConcepts",
            **with_search_aliases(["personalize", "concept", "multiple concepts", "multi-concept"]),
            display_name="Perfusion Combine Concepts",
            category=f"{CATEGORY}/apply",
            description="Puts several concepts into one set for Perfusion Apply Concept, which then edits the model "
                        "for all of them jointly, each with its own gate. Sets can be combined again.",
            inputs=[PerfusionConcept.Input("concept_1", tooltip="A concept or a set."),
                    PerfusionConcept.Input("concept_2", tooltip="A concept or a set."), *optional],
            outputs=[PerfusionConcept.Output(display_name="concepts", tooltip="All the concepts, as one set.")],
        )

    @classmethod
    def execute(cls, concept_1, concept_2, **more) -> io.NodeOutput:
        sets = [concept_1, concept_2] + [more[f"concept_{i}"] for i in range(3, MAX_INPUTS + 1)
                                         if more.get(f"concept_{i}") is not None]
        return io.NodeOutput(combine(sets))
