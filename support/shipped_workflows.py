"""The shipped workflows (workflows/*.json), built in ComfyUI's editor format.

The graphs are described here once, by node and input name; widget order, sockets and links come from
the node definitions of a real ComfyUI (booted in-process, with this pack loaded), so the files load in
the editor as if a user had built and saved them. `tools/make_workflows.py` writes them; a test checks that
the shipped files are what this module builds.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from .workflow_api import object_info_in_process, widget_layout

REPO = Path(__file__).resolve().parents[1]

WORKFLOWS = REPO / "workflows"
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SAM3_CHECKPOINT = "sam3.1_multiplex_fp16.safetensors"  # the name ComfyUI's own SAM3 blueprints load
SAM3_NODES = ["SAM3_Detect"]  # current ComfyUI's segmentation node (not in v0.3.64)
CONCEPT, OTHER_CONCEPT = "my_concept", "my_other_concept"
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"
GROUP_COLOR = "#3f789e"
SAM3_GROUP = "SAM3 masks (mute this group without SAM3)"


class Graph:
    """An editor-format graph built node by node."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, class_type: str, pos, widgets: dict | None = None, title: str | None = None,
            size=(320, 130), muted: bool = False) -> dict:
        info = self.info[class_type]
        widgets = dict(widgets or {})
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        values = []
        for name, has_control in widget_layout(info):
            values.append(widgets.pop(name) if name in widgets else _default(specs[name]))
            if has_control:
                values.append("fixed")  # shipped workflows reproduce: the seed does not change after a run
        if widgets:
            raise KeyError(f"{class_type} has no widgets {sorted(widgets)}")
        widget_names = {name for name, _ in widget_layout(info)}
        inputs = []
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, []):
                kind = specs[name][0]
                slot = {"name": name, "type": "COMBO" if isinstance(kind, list) else str(kind), "link": None}
                if name in widget_names:
                    slot["widget"] = {"name": name}
                inputs.append(slot)
        outputs = [{"name": str(name), "type": str(kind), "links": []}
                   for name, kind in zip(info["output_name"], info["output"])]
        node = {"id": len(self.nodes) + 1, "type": class_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": 0, "mode": 2 if muted else 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": class_type}, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def connect(self, source: dict, output: str, target: dict, input_name: str) -> None:
        origin_slot = next(i for i, o in enumerate(source["outputs"]) if o["name"] == output)
        target_slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == input_name)
        link_id = len(self.links) + 1
        kind = source["outputs"][origin_slot]["type"]
        self.links.append([link_id, source["id"], origin_slot, target["id"], target_slot, kind])
        source["outputs"][origin_slot]["links"].append(link_id)
        target["inputs"][target_slot]["link"] = link_id

    def connect_all(self, links: list[tuple]) -> None:
        """`connect` for each (source, output, target, input_name), in order (the order numbers the links)."""
        for link in links:
            self.connect(*link)

    def note(self, text: str, pos, size=(420, 220)) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
                "color": NOTE_COLOR, "bgcolor": NOTE_BGCOLOR}
        self.nodes.append(node)
        return node

    def group(self, title: str, members: list[dict], margin: int = 20) -> None:
        """A titled frame around `members` (the editor mutes or bypasses a group's nodes in one click)."""
        title_height = 80  # the group's own title bar, plus the members' title bars above their pos
        x0 = min(node["pos"][0] for node in members) - margin
        y0 = min(node["pos"][1] for node in members) - title_height
        x1 = max(node["pos"][0] + node["size"][0] for node in members) + margin
        y1 = max(node["pos"][1] + node["size"][1] for node in members) + margin
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": GROUP_COLOR, "font_size": 24, "flags": {}})

    def to_json(self, name: str) -> dict:
        self._number_execution_order()
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"perfusion/{name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}

    def _number_execution_order(self) -> None:
        parents = {node["id"]: {link[1] for link in self.links if link[3] == node["id"]} for node in self.nodes}
        order, done = 0, set()
        while len(done) < len(self.nodes):
            for node in self.nodes:
                if node["id"] not in done and parents[node["id"]] <= done:
                    node["order"] = order
                    order += 1
                    done.add(node["id"])


# The note at the top left of each workflow: what to do, in the user's words.
TRAIN_NOTE = (
    "TRAIN A CONCEPT\n\n"
    "1. Put 3-10 photos of your concept (different views and backgrounds, the concept filling much of "
    f"the frame) in ComfyUI/input/{CONCEPT}/ and choose that folder in 'Perfusion Load Photos'.\n"
    "2. Choose an SD1.x, SD2.x or SDXL checkpoint (for SDXL set size and resolution to 1024).\n"
    "3. In 'Perfusion Train Concept' set name (the word you will write as embedding:<name>) and "
    "superclass (one common word: teddy, cat, pot, sculpture).\n"
    "4. Queue. The concept is saved to ComfyUI/models/perfusion/<name>_00001.safetensors (tens of KB), "
    "a test image is drawn with it, and the loss curve is saved.\n\n"
    "Optional masks (white = the concept): one per photo, same file names, in "
    f"input/{CONCEPT}/mask/. They are used when the folder is there. (Or let SAM3 draw them: "
    "perfusion_train_auto_masks.)\n\n"
    "While it trains, the node renders its validation prompt every validate_every steps with the concept as it "
    "is then (Preview Image shows them); save_every keeps a file of each.")

GENERATE_NOTE = (
    "GENERATE WITH A CONCEPT\n\n"
    "1. Choose the checkpoint the concept was trained on, and the concept file (from "
    "ComfyUI/models/perfusion/).\n"
    "2. Write the concept in the prompt as embedding:<name>, like a word: 'a photo of "
    f"embedding:{CONCEPT} on the beach'. Use the CLIP that comes out of 'Perfusion Apply Concept'.\n"
    "3. Tuning: lower beta (0.6) shows the concept more strongly; higher beta (0.75) keeps the rest of "
    "the prompt in control. strength scales the whole edit; start_at/end_at limit it to part of "
    "the sampling.\n\n"
    "Works with LoRA (put LoraLoader before or after the apply node) and ControlNet; IPAdapter should "
    "compose too but is not tested yet.")

TWO_CONCEPTS_NOTE = (
    "TWO CONCEPTS IN ONE IMAGE\n\n"
    "Load two concept files trained on this checkpoint, combine them, and write both names in the "
    f"prompt: 'embedding:{CONCEPT} and embedding:{OTHER_CONCEPT}'. Up to 8 concepts can be combined.\n\n"
    "The combined concepts share one apply node's strength/beta/tau. For settings per concept, chain "
    "two 'Perfusion Apply Concept' nodes instead (model and clip from the first into the second): they "
    "form one joint edit.")


AUTO_MASKS_NOTE = (
    "TRAIN WITH MASKS MADE BY SAM3\n\n"
    "Like perfusion_train_concept, but the masks (what the loss looks at) are drawn in the graph: SAM3, the "
    "segmentation model of current ComfyUI, finds the superclass word in every photo.\n\n"
    "1. Put 3-10 photos in ComfyUI/input/my_concept/ and choose the folder in 'Perfusion Load Photos'.\n"
    "2. Choose your SD1.x/SD2.x/SDXL checkpoint, and the SAM3 checkpoint (models/checkpoints/"
    f"{SAM3_CHECKPOINT}, from ComfyUI's model downloads).\n"
    "3. Write the superclass once, in 'Superclass word': it names the concept to the trainer and to SAM3.\n"
    "4. Queue. 'Masks from SAM3' shows what SAM3 found: the loss is weighted by it.\n\n"
    f"No SAM3 (ComfyUI before SAM3, or no SAM3 model): right-click the group '{SAM3_GROUP}' and set its "
    "nodes to Never (mute). The training then runs without masks.")

SWEEP_NOTE = (
    "PICK BETA WITH A SWEEP\n\n"
    "Renders the same seed once per gate setting and puts the images side by side, captioned: pick the "
    "beta where the concept looks right and the prompt still holds, then set it in 'Perfusion Apply "
    "Concept'. No retraining: beta and tau only change how the concept is applied.\n\n"
    "1. Choose the checkpoint the concept was trained on, and the concept file.\n"
    "2. betas: a list such as 0.5, 0.6, 0.7, 0.8 (columns). taus (optional): a list such as 0.1, 0.2 "
    "(rows); empty keeps the apply node's tau.\n"
    "3. Queue. Lower beta shows the concept more strongly; higher beta gives the rest of the prompt more say.")


def _default(spec):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in options:
        return options["default"]
    choices = kind if isinstance(kind, list) else options.get("options", [])
    if choices:
        return choices[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _graph_with_checkpoint(info: dict, note: str, note_height: int, checkpoint_y: int) -> tuple[Graph, dict]:
    """A workflow with its note at the top left and the stock checkpoint loader below it."""
    graph = Graph(info)
    graph.note(note, (20, 20), size=(440, note_height))
    return graph, graph.add("CheckpointLoaderSimple", (20, checkpoint_y), {"ckpt_name": CHECKPOINT}, size=(440, 100))


def _load_concept(graph: Graph, name: str, y: int) -> dict:
    return graph.add("PerfusionLoadConcept", (20, y), {"concept_name": f"{name}_00001.safetensors"}, size=(440, 60))


def _apply_and_draw(graph: Graph, checkpoint: dict, concept_from: tuple, apply_pos, prompt: str, x: int,
                    prefix: str) -> None:
    """Perfusion Apply Concept on the checkpoint's MODEL and CLIP with the concept from `concept_from`, then the
    stock text-to-image tail on its outputs: prompt, negative prompt, empty latent, KSampler, decode and save."""
    apply = graph.add("PerfusionApplyConcept", apply_pos, size=(320, 250))
    graph.connect(checkpoint, "MODEL", apply, "model")
    graph.connect(checkpoint, "CLIP", apply, "clip")
    graph.connect(*concept_from, apply, "concept")
    y = 20
    positive, negative, latent = _prompts_and_latent(graph, apply, prompt, x)
    sampler = graph.add("KSampler", (x + 440, y), {"steps": 30, "cfg": 7.0, "sampler_name": "euler",
                                                  "scheduler": "normal", "seed": 0}, size=(320, 270))
    decode = graph.add("VAEDecode", (x + 800, y), size=(210, 50))
    save = graph.add("SaveImage", (x + 800, y + 100), {"filename_prefix": prefix}, size=(420, 460))
    graph.connect_all([(apply, "MODEL", sampler, "model"), (positive, "CONDITIONING", sampler, "positive"),
                       (negative, "CONDITIONING", sampler, "negative"), (latent, "LATENT", sampler, "latent_image"),
                       (sampler, "LATENT", decode, "samples"), (checkpoint, "VAE", decode, "vae"),
                       (decode, "IMAGE", save, "images")])


def _prompts_and_latent(graph: Graph, apply: dict, prompt: str, x: int) -> tuple[dict, dict, dict]:
    """The prompt and negative prompt, encoded with the apply node's CLIP, and an empty 512x512 latent, in a
    column at `x`."""
    positive = graph.add("CLIPTextEncode", (x, 20), {"text": prompt}, title="Prompt (write embedding:<name>)",
                         size=(400, 160))
    negative = graph.add("CLIPTextEncode", (x, 220), {"text": "blurry, low quality, deformed"},
                         title="Negative prompt", size=(400, 120))
    latent = graph.add("EmptyLatentImage", (x, 380), {"width": 512, "height": 512, "batch_size": 1}, size=(320, 110))
    graph.connect(apply, "CLIP", positive, "clip")
    graph.connect(apply, "CLIP", negative, "clip")
    return positive, negative, latent


def train_concept(info: dict) -> dict:
    graph, checkpoint = _graph_with_checkpoint(info, TRAIN_NOTE, 330, 390)
    photos = graph.add("PerfusionLoadPhotos", (20, 540), {"folder": CONCEPT}, size=(440, 110))
    train = _train_and_save(graph, (500, 20), "teddy")
    links = [(checkpoint, "MODEL", train, "model"), (checkpoint, "CLIP", train, "clip"),
             (checkpoint, "VAE", train, "vae"), (photos, "images", train, "images"), (photos, "masks", train, "masks")]
    graph.connect_all(links)
    _apply_and_draw(graph, checkpoint, (train, "concept"), (940, 240),
                    f"a photo of embedding:{CONCEPT} on a wooden table", 1300, f"perfusion/{CONCEPT}")
    return graph.to_json("train_concept")


def _train_and_save(graph: Graph, pos, superclass: str) -> dict:
    """The train node at `pos` with a validation prompt, and right of it: save the concept, plot the loss,
    preview the validation renders (below the apply node's place in the train workflow)."""
    x, y = pos
    train = graph.add("PerfusionTrainConcept", pos, {
        "name": CONCEPT, "superclass": superclass, "validate_every": 100,
        "validation_prompt": f"a photo of embedding:{CONCEPT} on a wooden table"}, size=(400, 720))
    save = graph.add("PerfusionSaveConcept", (x + 440, y), {"filename_prefix": "{name}"}, size=(320, 60))
    loss = graph.add("LossGraphNode", (x + 440, y + 100), {"filename_prefix": f"{CONCEPT}_loss"}, size=(320, 60))
    validation = graph.add("PreviewImage", (x, y + 770), title="Validation renders", size=(400, 360))
    graph.connect_all([(train, "concept", save, "concept"), (train, "loss", loss, "loss"),
                       (train, "validation", validation, "images")])
    return train


def train_auto_masks(info: dict) -> dict:
    graph, checkpoint = _graph_with_checkpoint(info, AUTO_MASKS_NOTE, 380, 440)
    photos = graph.add("PerfusionLoadPhotos", (20, 580), {"folder": CONCEPT}, size=(440, 110))
    word = graph.add("PrimitiveString", (20, 760), {"value": "teddy"}, title="Superclass word", size=(440, 60))
    sam3 = graph.add("CheckpointLoaderSimple", (20, 910), {"ckpt_name": SAM3_CHECKPOINT}, title="SAM3 model",
                     size=(440, 100))
    what = graph.add("CLIPTextEncode", (20, 1050), title="What SAM3 looks for", size=(440, 100))
    detect = graph.add("SAM3_Detect", (20, 1190), size=(440, 180))
    shown = graph.add("MaskPreview", (20, 1440), title="Masks from SAM3", size=(440, 300))
    graph.group(SAM3_GROUP, [sam3, what, detect, shown])
    train = _train_and_save(graph, (500, 20), "teddy")
    links = [(checkpoint, "MODEL", train, "model"), (checkpoint, "CLIP", train, "clip"),
             (checkpoint, "VAE", train, "vae"), (photos, "images", train, "images"),
             (word, "STRING", train, "superclass"), (word, "STRING", what, "text"), (sam3, "CLIP", what, "clip"),
             (sam3, "MODEL", detect, "model"), (photos, "images", detect, "image"),
             (what, "CONDITIONING", detect, "conditioning"), (detect, "masks", train, "masks"),
             (detect, "masks", shown, "mask")]
    graph.connect_all(links)
    return graph.to_json("train_auto_masks")


def gate_sweep(info: dict) -> dict:
    graph, checkpoint = _graph_with_checkpoint(info, SWEEP_NOTE, 300, 360)
    concept = _load_concept(graph, CONCEPT, 500)
    apply = graph.add("PerfusionApplyConcept", (500, 360), size=(320, 250))
    positive, negative, latent = _prompts_and_latent(graph, apply, f"a photo of embedding:{CONCEPT} on the beach, sunset",
                                                     860)
    sweep = graph.add("PerfusionGateSweep", (1300, 20), {"steps": 30, "cfg": 7.0, "sampler_name": "euler",
                                                         "scheduler": "normal", "seed": 0}, size=(340, 360))
    save = graph.add("SaveImage", (1680, 20), {"filename_prefix": f"perfusion/{CONCEPT}_sweep"}, size=(520, 360))
    links = [(checkpoint, "MODEL", apply, "model"), (checkpoint, "CLIP", apply, "clip"),
             (concept, "concept", apply, "concept"), (apply, "MODEL", sweep, "model"), (checkpoint, "VAE", sweep, "vae"),
             (positive, "CONDITIONING", sweep, "positive"), (negative, "CONDITIONING", sweep, "negative"),
             (latent, "LATENT", sweep, "latent_image"), (sweep, "grid", save, "images")]
    graph.connect_all(links)
    return graph.to_json("gate_sweep")


def generate(info: dict) -> dict:
    graph, checkpoint = _graph_with_checkpoint(info, GENERATE_NOTE, 300, 360)
    concept = _load_concept(graph, CONCEPT, 500)
    _apply_and_draw(graph, checkpoint, (concept, "concept"), (500, 360),
                    f"a photo of embedding:{CONCEPT} on the beach, sunset", 860, f"perfusion/{CONCEPT}")
    return graph.to_json("generate")


def two_concepts(info: dict) -> dict:
    graph, checkpoint = _graph_with_checkpoint(info, TWO_CONCEPTS_NOTE, 260, 320)
    first, second = _load_concept(graph, CONCEPT, 460), _load_concept(graph, OTHER_CONCEPT, 560)
    combine = graph.add("PerfusionCombineConcepts", (500, 520), size=(320, 100))
    graph.connect(first, "concept", combine, "concept_1")
    graph.connect(second, "concept", combine, "concept_2")
    _apply_and_draw(graph, checkpoint, (combine, "concepts"), (500, 200),
                    f"a photo of embedding:{CONCEPT} and embedding:{OTHER_CONCEPT} sitting in a garden", 860,
                    "perfusion/two_concepts")
    return graph.to_json("two_concepts")


BUILDERS = {"perfusion_train_concept.json": train_concept, "perfusion_generate.json": generate,
            "perfusion_two_concepts.json": two_concepts, "perfusion_gate_sweep.json": gate_sweep,
            "perfusion_train_auto_masks.json": train_auto_masks}
NEEDS_SAM3 = {"perfusion_train_auto_masks.json"}  # built where the host has SAM3 (v0.33.0), shipped for it
CLASS_TYPES = ["CheckpointLoaderSimple", "PerfusionLoadPhotos", "PerfusionTrainConcept",
               "PerfusionSaveConcept", "LossGraphNode", "PerfusionApplyConcept", "PerfusionLoadConcept",
               "PerfusionCombineConcepts", "PerfusionGateSweep", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
               "VAEDecode", "SaveImage", "PreviewImage", "PrimitiveString", "MaskPreview"]


def node_definitions() -> dict:
    """The definitions of every node the workflows use; an unknown node is an error, except the SAM3 nodes
    on a host without them (then `buildable` leaves out the workflows that need them)."""
    info = object_info_in_process(CLASS_TYPES + SAM3_NODES)
    missing = sorted(set(CLASS_TYPES) - set(info))
    if missing:
        raise RuntimeError(f"ComfyUI does not know {missing}")
    return info


def buildable(info: dict) -> dict:
    """The builders whose nodes this host knows."""
    has_sam3 = set(SAM3_NODES) <= set(info)
    return {name: build for name, build in BUILDERS.items() if has_sam3 or name not in NEEDS_SAM3}

