"""Issue 8: the toy world of experiments/toy_world is deterministic and its captions follow its grammar.
(The training and the experiments themselves are run by experiments/toy_world/run.py, not by the tests.)"""
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments" / "toy_world"))
import world  # noqa: E402


def test_world_is_deterministic_from_its_seed():
    scenes_a, images_a = world.world_dataset(24, seed=5)
    scenes_b, images_b = world.world_dataset(24, seed=5)
    assert [s.caption for s in scenes_a] == [s.caption for s in scenes_b]
    assert np.array_equal(images_a, images_b)
    scenes_c, images_c = world.world_dataset(24, seed=6)
    assert [s.caption for s in scenes_a] != [s.caption for s in scenes_c]
    assert images_a.shape == (24, world.SIZE, world.SIZE, 3) and images_a.dtype == np.float32
    assert 0.0 <= images_a.min() and images_a.max() <= 1.0
    for name in world.CONCEPTS:
        photos = [world.render(s) for s in world.concept_training_scenes(name, seed=1)]
        again = [world.render(s) for s in world.concept_training_scenes(name, seed=1)]
        assert all(np.array_equal(p, q) for p, q in zip(photos, again))


def test_captions_parse_and_agree_with_the_scene():
    scenes, _ = world.world_dataset(200, seed=0)
    for scene in scenes:
        parsed = world.parse_caption(scene.caption)
        assert len(parsed["objects"]) == len(scene.objects)
        assert parsed["background"] in (None, scene.background)
        for said, obj in zip(parsed["objects"], scene.objects):
            assert said["shape"] == obj.shape
            assert said["colour"] in (None, obj.colour_word)
            assert said["size"] in (None, obj.size_word)
            assert said["pattern"] == obj.look.kind
        if len(scene.objects) == 1:
            assert parsed["position"] in (None, scene.objects[0].position_word)
    full = world.caption_for(scenes[0].objects, scenes[0].background, None, full=True)
    assert world.parse_caption(full)["background"] == scenes[0].background
    concept = world.parse_caption("a embedding:tw_star on grass, on the left")
    assert concept["objects"][0]["concept"] == "tw_star" and concept["position"] == "left"
    with pytest.raises(ValueError):
        world.parse_caption("a red star under grass")


def test_concepts_are_held_out_of_the_base_world():
    scenes, _ = world.world_dataset(300, seed=1)
    looks = {o.look for s in scenes for o in s.objects}
    assert not looks & {look for _, look in world.CONCEPTS.values()}
    assert {shape for shape, _ in world.CONCEPTS.values()} <= set(world.SHAPES)


@pytest.mark.host
def test_world_words_are_single_clip_tokens():
    import comfy.sd1_clip
    tokenizer = comfy.sd1_clip.SD1Tokenizer().clip_l.tokenizer
    words = [*world.SHAPES, *world.COLOURS, *world.BACKGROUNDS, *world.POSITIONS, *world.SIZES, "striped", "dotted"]
    for word in words:
        assert len(tokenizer(word)["input_ids"]) == 3, word  # BOS, the word, EOS
