"""The toy world: 48x48 scenes of simple objects on coloured backgrounds, with captions from a small grammar.

Everything is deterministic from a seed. Captions are built so that every attribute is carried by its own
word (object colours, background scenes, positions and sizes use disjoint vocabularies), because the base
model's text encoder is context-free (see base_model.py): a word's meaning must not depend on its neighbours.

    a big red striped star on grass, on the left
    a photo of a small blue circle on night
    a yellow square and a dotted purple triangle on sand        (two objects: first left, second right)

Held-out concepts (never in base training) are objects of a world superclass with a look of their own,
e.g. a star whose top half is cyan and bottom half magenta.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace

import numpy as np

CANVAS = 64        # scene geometry (positions, radii) is given in units of a 64x64 canvas
SIZE = 48          # image side in pixels (48x48 images: 6x6 latents, cheap enough for 2 shared CPU cores)
SUPERSAMPLE = 3    # pixels rendered at 3x3 subsamples and averaged: smooth edges

SHAPES = ("star", "circle", "square", "triangle")          # superclasses: one CLIP token each
COLOURS = {"red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
           "yellow": (0.95, 0.85, 0.10), "purple": (0.60, 0.20, 0.80), "orange": (1.00, 0.55, 0.05)}
BACKGROUNDS = {"grass": (0.25, 0.45, 0.20), "sand": (0.86, 0.78, 0.60), "sky": (0.55, 0.78, 0.98),
               "night": (0.05, 0.06, 0.20), "snow": (0.95, 0.95, 0.97), "brick": (0.50, 0.20, 0.15)}
POSITIONS = {"left": 17.0, "center": 32.0, "right": 47.0}   # object centre x, in pixels
SIZES = {"small": 9.0, "big": 14.0}                          # object radius, in pixels
PATTERNS = ("plain", "striped", "dotted")                    # "plain" is never written
# The words the pack's training templates use (perfusion_ops/train.py TEMPLATES), as caption prefixes, so
# the base model has seen them and ignores them.
PREFIXES = ("", "", "", "a photo of ", "a good photo of ", "the photo of ", "image of ", "a photograph of ")


@dataclass(frozen=True)
class Look:
    """How an object is painted. kind: plain | striped | dotted | split (two halves) | bullseye (ring + core)."""
    kind: str
    colour: tuple
    colour2: tuple = (0.0, 0.0, 0.0)
    axis: int = 0  # split: 0 = top/bottom halves, 1 = left/right halves


@dataclass(frozen=True)
class Obj:
    shape: str
    look: Look
    x: float
    y: float
    radius: float
    colour_word: str | None = None   # None for looks outside the world's vocabulary (random looks, concepts)
    size_word: str | None = None
    position_word: str | None = None
    concept: str | None = None       # name of the held-out concept this object is, if any


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple
    caption: str = ""
    gradient: float = 0.0            # background brightness gradient, top to bottom
    labels: dict = field(default_factory=dict, compare=False)


# Held-out concepts: a superclass of the world with a look never used in base training.
CONCEPTS = {
    "tw_star": ("star", Look("split", (0.00, 0.85, 0.85), (0.95, 0.10, 0.65), axis=0)),       # cyan over magenta
    "tw_circle": ("circle", Look("bullseye", (0.60, 0.95, 0.10), (0.30, 0.00, 0.50))),        # lime ring, indigo core
}


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _polygon_mask(px, py, vertices):
    """Even-odd point-in-polygon test, vectorised over the pixel grid."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def _shape_mask(shape, dx, dy, r):
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":
        verts = [(0.0, -r), (0.95 * r, 0.75 * r), (-0.95 * r, 0.75 * r)]
        return _polygon_mask(dx, dy, verts)
    if shape == "star":
        verts = []
        for k in range(10):
            angle = -np.pi / 2 + k * np.pi / 5
            rad = r if k % 2 == 0 else 0.45 * r
            verts.append((rad * np.cos(angle), rad * np.sin(angle)))
        return _polygon_mask(dx, dy, verts)
    raise ValueError(shape)


def _paint(look: Look, dx, dy, r):
    """RGB of the object's surface at offsets (dx, dy) from its centre."""
    base = np.broadcast_to(np.array(look.colour, dtype=np.float32), dx.shape + (3,)).copy()
    other = np.array(look.colour2, dtype=np.float32)
    if look.kind == "striped":
        band = (np.floor((dy + 100.0) / (0.4 * r)).astype(int) % 2) == 1
        base[band] = base[band] * 0.25
    elif look.kind == "dotted":
        spacing = 0.7 * r
        gx = (dx + 100.0) % spacing - spacing / 2
        gy = (dy + 100.0) % spacing - spacing / 2
        base[gx ** 2 + gy ** 2 <= (0.22 * r) ** 2] = (1.0, 1.0, 1.0)
    elif look.kind == "split":
        second = (dy > 0) if look.axis == 0 else (dx > 0)
        base[second] = other
    elif look.kind == "bullseye":
        base[dx ** 2 + dy ** 2 <= (0.5 * r) ** 2] = other
    elif look.kind != "plain":
        raise ValueError(look.kind)
    return base


def _subsample_grid() -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates (x, y) of every subsample: SUPERSAMPLE x SUPERSAMPLE per pixel."""
    n = SIZE * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) * (CANVAS / n)
    return np.meshgrid(coords, coords)


def _pixel_mean(subsamples: np.ndarray) -> np.ndarray:
    """Subsamples [SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE, ...] averaged into pixels [SIZE, SIZE, ...]."""
    return subsamples.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, *subsamples.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The scene as float32 RGB in [0, 1], [SIZE, SIZE, 3]."""
    px, py = _subsample_grid()
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    shade = 1.0 + scene.gradient * (py / CANVAS - 0.5)
    image = np.clip(bg[None, None] * shade[..., None], 0, 1)
    for obj in scene.objects:
        dx, dy = px - obj.x, py - obj.y
        mask = _shape_mask(obj.shape, dx, dy, obj.radius)
        surface = _paint(obj.look, dx, dy, obj.radius)
        image = np.where(mask[..., None], surface, image)
    return _pixel_mean(image).astype(np.float32)


def object_mask(scene: Scene) -> np.ndarray:
    """The share of each pixel the scene's objects cover, float32 [SIZE, SIZE] in [0, 1] (render's geometry)."""
    px, py = _subsample_grid()
    covered = np.zeros(px.shape, dtype=bool)
    for obj in scene.objects:
        covered |= _shape_mask(obj.shape, px - obj.x, py - obj.y, obj.radius)
    return _pixel_mean(covered).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Sampling scenes and captions


def _world_object(rng: random.Random, slot: str | None = None, size_word=None, colour_word=None, shape=None,
                  pattern=None, position_word=None) -> Obj:
    """An object of the world. slot: None (single object, any position), 'first'/'second' (two-object scene)."""
    shape = shape or rng.choice(SHAPES)
    colour_word = colour_word or rng.choice(list(COLOURS))
    pattern = pattern or rng.choice(PATTERNS)
    if slot is None:
        size_word = size_word or rng.choice(list(SIZES))
        position_word = position_word or rng.choice(list(POSITIONS))
        x = POSITIONS[position_word] + rng.uniform(-3, 3)
        radius = SIZES[size_word] + rng.uniform(-1, 1)
    else:
        size_word, position_word = None, None
        x = (18.0 if slot == "first" else 46.0) + rng.uniform(-2, 2)
        radius = rng.uniform(9.5, 12.0)
    y = 32.0 + rng.uniform(-6, 6)
    return Obj(shape, Look(pattern, COLOURS[colour_word]), x, y, radius, colour_word, size_word, position_word)


def random_look(rng: random.Random) -> Look:
    """A look outside the world's vocabulary (for the VAE and the judges, and for the base UNet where its config
    asks for random_looks)."""
    kind = rng.choice(("plain", "striped", "dotted", "split", "split", "bullseye", "bullseye"))
    c1 = tuple(rng.uniform(0, 1) for _ in range(3))
    c2 = tuple(rng.uniform(0, 1) for _ in range(3))
    return Look(kind, c1, c2, axis=rng.randint(0, 1))


def near_concept(look: Look, tolerance: float = 0.35) -> bool:
    """Whether a look is one of the held-out concepts' looks up to `tolerance` (RGB distance of each colour)."""
    def close(a, b):
        return float(np.linalg.norm(np.subtract(a, b))) < tolerance
    return any(look.kind == held.kind and close(look.colour, held.colour) and close(look.colour2, held.colour2)
               for _, held in CONCEPTS.values())


def concept_object(name: str, rng: random.Random, position_word=None, size_word="big", slot=None) -> Obj:
    shape, look = CONCEPTS[name]
    obj = _world_object(rng, slot=slot, size_word=size_word, shape=shape, position_word=position_word)
    return replace(obj, look=look, colour_word=None, concept=name)


def _noun_phrase(obj: Obj, words: dict) -> str:
    parts = ["a"]
    if words.get("size") and obj.size_word:
        parts.append(obj.size_word)
    if words.get("colour") and obj.colour_word:
        parts.append(obj.colour_word)
    if obj.look.kind in ("striped", "dotted"):
        parts.append(obj.look.kind)
    parts.append(obj.shape)
    return " ".join(parts)


def caption_for(scene_objects, background, rng: random.Random | None, full: bool = False) -> str:
    """A caption of the scene. full=True writes every attribute (for evaluation prompts); otherwise some
    attributes are dropped at random (the model also learns to fill them in)."""
    keep = (lambda p: True) if full else (lambda p: rng.random() < p)
    prefix = "" if full else rng.choice(PREFIXES)
    if len(scene_objects) == 1:
        obj = scene_objects[0]
        words = {"size": keep(0.7), "colour": keep(0.85)}
        text = prefix + _noun_phrase(obj, words)
        if keep(0.9):
            text += f" on {background}"
        if keep(0.85) and obj.position_word:
            text += f", on the {obj.position_word}"
        return text
    words = {"size": False, "colour": keep(0.85)}
    text = prefix + " and ".join(_noun_phrase(o, words) for o in scene_objects)
    if keep(0.9):
        text += f" on {background}"
    return text


def world_scene(rng: random.Random, two_objects: float = 0.2, random_looks: float = 0.0) -> Scene:
    """A scene of the base world with its caption and labels. random_looks: the share of objects painted with a
    look outside the vocabulary (random_look; their captions name no colour), so that the base, like a real
    text-to-image model, can render far more looks than its words name and a concept's look is one it can reach."""
    background = rng.choice(list(BACKGROUNDS))

    def unnamed(obj):  # draws nothing when random_looks is 0: bases built before it keep their data
        if random_looks and rng.random() < random_looks:
            look = random_look(rng)
            while near_concept(look):  # the concepts stay held out
                look = random_look(rng)
            return replace(obj, look=look, colour_word=None)
        return obj
    if rng.random() < two_objects:
        objects = (unnamed(_world_object(rng, "first")), unnamed(_world_object(rng, "second")))
    else:
        objects = (unnamed(_world_object(rng)),)
    gradient = rng.uniform(-0.15, 0.15)
    caption = caption_for(objects, background, rng)
    return Scene(background, objects, caption, gradient, labels=labels_of(background, objects))


def labels_of(background, objects) -> dict:
    labels = {"background": background, "n_objects": len(objects),
              "concepts": sorted({o.concept for o in objects if o.concept})}
    if len(objects) == 1:
        o = objects[0]
        labels.update(shape=o.shape, colour=o.colour_word, size=o.size_word or _size_word(o.radius),
                      position=o.position_word or _position_word(o.x))
    return labels


def _size_word(radius):
    return "small" if radius < (SIZES["small"] + SIZES["big"]) / 2 else "big"


def _position_word(x):
    return min(POSITIONS, key=lambda p: abs(POSITIONS[p] - x))


def generic_scene(rng: random.Random, concept_rate: float = 0.0) -> Scene:
    """A scene whose objects may have random looks or be held-out concepts (for the VAE and the judges)."""
    background = rng.choice(list(BACKGROUNDS))
    two = rng.random() < 0.3

    def one(slot):
        obj = _world_object(rng, slot)
        u = rng.random()
        if u < concept_rate:
            name = rng.choice(sorted(CONCEPTS))
            return concept_object(name, rng, position_word=obj.position_word, size_word=obj.size_word or "big",
                                  slot=slot)
        if u < 0.5 + concept_rate / 2:
            return replace(obj, look=random_look(rng), colour_word=None)
        return obj
    objects = (one("first"), one("second")) if two else (one(None),)
    return Scene(background, objects, "", rng.uniform(-0.15, 0.15), labels=labels_of(background, objects))


def world_dataset(n: int, seed: int, two_objects: float = 0.2, random_looks: float = 0.0):
    """n scenes of the base world and their images [n, SIZE, SIZE, 3]."""
    rng = random.Random(seed)
    scenes = [world_scene(rng, two_objects, random_looks) for _ in range(n)]
    return scenes, np.stack([render(s) for s in scenes])


def generic_dataset(n: int, seed: int, concept_rate: float = 0.0):
    rng = random.Random(seed)
    scenes = [generic_scene(rng, concept_rate) for _ in range(n)]
    return scenes, np.stack([render(s) for s in scenes])


def concept_training_scenes(name: str, seed: int, n: int = 4) -> list[Scene]:
    """The few photos a concept is learned from: big, in the centre, on sand or snow only (so grass, sky,
    night, brick and the left/right positions are contexts the concept was never shown in)."""
    rng = random.Random(seed)
    scenes = []
    for i in range(n):
        background = ("sand", "snow")[i % 2]
        obj = concept_object(name, rng, position_word="center", size_word="big")
        scenes.append(Scene(background, (obj,), "", rng.uniform(-0.15, 0.15), labels=labels_of(background, (obj,))))
    return scenes


# ----------------------------------------------------------------------------------------------------------
# Parsing captions (the grammar above, and prompts with embedding:<name>)

_NOUN = r"a(?: (?P<size{i}>small|big))?(?: (?P<colour{i}>{colours}))?(?: (?P<pattern{i}>striped|dotted))? " \
        r"(?P<shape{i}>{shapes}|embedding:[\w.\-]+)"


def _caption_pattern():
    colours = "|".join(COLOURS)
    shapes = "|".join(SHAPES)
    noun = lambda i: _NOUN.format(i=i, colours=colours, shapes=shapes)  # noqa: E731
    prefix = "(?:" + "|".join(re.escape(p) for p in sorted(set(PREFIXES) - {""})) + ")?"
    return re.compile("^" + prefix + noun(1) + f"(?: and {noun(2)})?"
                      + f"(?: on (?P<background>{'|'.join(BACKGROUNDS)}))?"
                      + f"(?:, on the (?P<position>{'|'.join(POSITIONS)}))?$")


CAPTION = _caption_pattern()


def parse_caption(caption: str) -> dict:
    """The attributes a caption asks for (None where it leaves one open). Raises ValueError if it does not
    follow the grammar."""
    m = CAPTION.match(caption)
    if m is None:
        raise ValueError(f"not a caption of the toy world: {caption!r}")
    g = m.groupdict()
    objects = []
    for i in (1, 2):
        if g[f"shape{i}"] is None:
            continue
        shape = g[f"shape{i}"]
        objects.append({"shape": shape if not shape.startswith("embedding:") else None,
                        "concept": shape[len("embedding:"):] if shape.startswith("embedding:") else None,
                        "size": g[f"size{i}"], "colour": g[f"colour{i}"],
                        "pattern": g[f"pattern{i}"] or ("plain" if not shape.startswith("embedding:") else None)})
    if len(objects) == 2 and g["position"]:
        raise ValueError(f"two-object captions take no position phrase: {caption!r}")
    return {"objects": objects, "background": g["background"], "position": g["position"]}
