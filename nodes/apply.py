"""Apply concepts to a MODEL and a CLIP."""
from __future__ import annotations

from comfy_api.latest import io

from ..perfusion_ops.concept import ConceptSet, INFERENCE_BETA, INFERENCE_TAU
from ..perfusion_ops.patch import apply_concepts
from ..perfusion_ops.text import KEY_LOCKING, clip_with_concepts
from .common import CATEGORY, PerfusionConcept, advanced, with_search_aliases


class PerfusionApplyConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PerfusionApplyConcept",
            **with_search_aliases(["personalize", "concept", "textual inversion", "dreambooth", "embedding"]),
            display_name="Perfusion Apply Concept",
            category=f"{CATEGORY}/apply",
            description="Adds a concept (or a set) to copies of the model and CLIP. Write it in prompts as "
                        "embedding:<name>. Chain several apply nodes to give concepts their own settings; "
                        "they form one joint edit. The inputs themselves are never changed.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x or SDXL) to add the concept to."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint; embedding:<name> works in the CLIP "
                                              "this node returns."),
                PerfusionConcept.Input("concept", tooltip="A concept or a set of concepts (Load, Train or Combine)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="How strongly the concept edits the model. 0 leaves the model exactly as "
                                       "it was; 1 is the paper's edit."),
                io.Float.Input("beta", default=INFERENCE_BETA, min=-1.0, max=2.0, step=0.01,
                               tooltip="Gate bias. Higher: only tokens very like the concept open the gate (more "
                                       "prompt alignment). Lower: the concept shows more strongly (more fidelity, "
                                       "may take over the image). Paper range 0.6-0.75."),
                io.Float.Input("tau", default=INFERENCE_TAU, min=0.01, max=1.0, step=0.01,
                               tooltip="Gate temperature: how softly the gate opens around beta. 0.15 works best "
                                       "in the paper; smaller is sharper."),
                advanced(io.Float.Input(
                    "start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Fraction of the sampling schedule at which the edit switches on.")),
                advanced(io.Float.Input(
                    "end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Fraction of the sampling schedule at which the edit switches off.")),
                advanced(io.Combo.Input(
                    "multi_concept_mode", options=["exact", "approximate"], default="exact", optional=True,
                    tooltip="With several concepts on one model: 'exact' removes all their directions jointly "
                            "(docs/method.md §2); 'approximate' treats each concept on its own. The last apply node "
                            "in a chain decides. No effect with one concept.")),
                io.Combo.Input("key_locking", options=list(KEY_LOCKING), default="local", optional=True,
                               tooltip="'local' (the paper's default): the concept's key is locked to its "
                                       "superclass word's. 'global': the keys of every word come from the prompt "
                                       "with the superclass word in place of each concept, so the concept relates "
                                       "to the other words as the superclass would (e.g. two concepts in one "
                                       "image); the paper suggests beta 0.4-0.6 with it. The last apply node in a "
                                       "chain decides."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A copy of the model with the concept(s)."),
                     io.Clip.Output(display_name="CLIP", tooltip="A copy of the CLIP that knows embedding:<name>.")],
        )

    @classmethod
    def execute(cls, model, clip, concept: ConceptSet, strength, beta, tau, start_at, end_at,
                multi_concept_mode="exact", key_locking="local") -> io.NodeOutput:
        concepts = list(concept.concepts)
        patched_model = apply_concepts(model, concepts, strength, beta, tau, start_at, end_at,
                                       exact=multi_concept_mode == "exact", key_locking=key_locking)
        patched_clip = clip_with_concepts(clip, concepts, key_locking)
        notes = [f"embedding:{c.name} — file recommends beta {c.beta:g}, tau {c.tau:g}; using beta {beta:g}, "
                 f"tau {tau:g}, strength {strength:g}" for c in concepts]
        return io.NodeOutput(patched_model, patched_clip, ui={"text": notes})
