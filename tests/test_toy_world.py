"""Issue 8: the toy world of experiments/toy_world is deterministic and its captions follow its grammar.
(The training and the experiments themselves are run by experiments/toy_world/run.py, not by the tests.)"""
import sys
from dataclasses import replace

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
    # with random looks too: none of them is near a concept's look, and the check sees a look that is
    for _, look in world.CONCEPTS.values():
        assert world.near_concept(look)
        assert world.near_concept(replace(look, colour=tuple(c + 0.15 for c in look.colour)))
        assert not world.near_concept(replace(look, kind="plain"))
        assert not world.near_concept(replace(look, colour2=tuple(1.0 - c for c in look.colour2)))
    scenes, _ = world.world_dataset(2000, seed=1, random_looks=0.5)
    assert not any(world.near_concept(o.look) for s in scenes for o in s.objects)


def test_random_looks_are_unnamed_and_leave_the_plain_world_as_it_was():
    """The base of REPORT.md §6-§8 was built from world_dataset(..., seed=2) before random looks existed: with
    random_looks 0 the data must not change (digests of that data), and with them the captions name no colour
    for a random look and still follow the grammar."""
    import hashlib
    scenes, images = world.world_dataset(200, seed=2, two_objects=0.2, random_looks=0.0)
    assert hashlib.sha256("\n".join(s.caption for s in scenes).encode()).hexdigest()[:16] == "5725e066d3d3346c"
    assert hashlib.sha256(images.tobytes()).hexdigest()[:16] == "ace4631f54abc5cc"
    scenes, _ = world.world_dataset(600, seed=2, two_objects=0.2, random_looks=0.3)
    objects = [o for s in scenes for o in s.objects]
    unnamed = [o for o in objects if o.colour_word is None]
    assert 0.25 < len(unnamed) / len(objects) < 0.35
    assert {o.look.kind for o in unnamed} == {"plain", "striped", "dotted", "split", "bullseye"}
    for scene in scenes:
        parsed = world.parse_caption(scene.caption)
        for said, obj in zip(parsed["objects"], scene.objects):
            assert said["shape"] == obj.shape
            if obj.colour_word is None:
                assert said["colour"] is None
            assert said["pattern"] == (obj.look.kind if obj.look.kind in ("striped", "dotted") else "plain")


@pytest.mark.host
def test_world_words_are_single_clip_tokens():
    import comfy.sd1_clip
    tokenizer = comfy.sd1_clip.SD1Tokenizer().clip_l.tokenizer
    words = [*world.SHAPES, *world.COLOURS, *world.BACKGROUNDS, *world.POSITIONS, *world.SIZES, "striped", "dotted"]
    for word in words:
        assert len(tokenizer(word)["input_ids"]) == 3, word  # BOS, the word, EOS


def test_front_prompts_ask_for_what_the_photos_contradict():
    import front
    photos = [s.labels for s in world.concept_training_scenes(front.CONCEPT, seed=7)]
    prompts = front.front_prompts(f"embedding:{front.CONCEPT}")
    assert len(prompts) == 8
    for text, want in prompts.values():
        parsed = world.parse_caption(text)
        assert parsed["objects"][0]["concept"] == front.CONCEPT
        assert (parsed["objects"][0]["size"], parsed["background"], parsed["position"]) == \
            (want["size"], want["background"], want["position"])
        assert all(want["size"] != p["size"] and want["background"] != p["background"]
                   and want["position"] != p["position"] for p in photos)
    contexts = front.front_prompts(f"embedding:{front.CONCEPT}", "contexts")
    assert list(contexts) == list(prompts)
    for (text, want), (small_text, small_want) in zip(contexts.values(), prompts.values()):
        assert world.parse_caption(text)["objects"][0]["size"] is None and "size" not in want
        assert text == small_text.replace(f"{front.SIZE_WORD} ", "") and small_want == {**want, "size": "small"}


def _front_rows(locked, trained, ti_point, seeds=(0, 1, 2)):
    """Rows as front.run_front writes them: curves of (beta, fidelity, alignment) per method, the same per seed
    up to a seed offset in alignment (kept within 0..1)."""
    rows = []
    for seed in seeds:
        for method, curve in (("perfusion", locked), ("trained_keys", trained), ("ti", [ti_point])):
            for beta, fidelity, alignment in curve:
                rows.append({"method": method, "seed": seed, "beta": beta, "tau": 0.15, "label": f"{method} {beta}",
                             "fidelity": fidelity, "detected": fidelity, "alignment": alignment - 0.01 * seed,
                             "images": 24})
    return {"rows": rows}


def test_front_compares_methods_at_equal_fidelity_not_at_equal_beta():
    import front
    betas = [0.4, 0.55, 0.7, 0.85, 1.0]
    locked = [(b, 1.0 - b, b) for b in betas]              # alignment = 1 - fidelity
    trained = [(b, 1.2 - b, b - 0.3) for b in betas]       # alignment = 0.9 - fidelity: 0.1 below at equal fidelity
    results = _front_rows(locked, trained, (0.7, 0.45, 0.35))  # on the locked curve 0.55 - 0.35 = 0.2 below
    vs_trained = front.equal_fidelity(results, "trained_keys")["alignment_difference"]
    assert vs_trained["per_seed"] == pytest.approx([0.1, 0.1, 0.1])  # at equal beta it would read 0.3
    vs_ti = front.equal_fidelity(results, "ti")["alignment_difference"]
    assert vs_ti["per_seed"] == pytest.approx([0.2, 0.2, 0.2]) and vs_ti["low"] == pytest.approx(0.2)
    knob = front.knob(results)
    assert knob["betas"] == [0.4, 1.0]
    assert knob["fidelity_fall"]["mean"] == pytest.approx(0.6) and knob["alignment_rise"]["mean"] == pytest.approx(0.6)
    apart = _front_rows(locked, [(b, f + 2.0, a) for b, f, a in trained], (0.7, 0.45, 0.35))
    assert front.equal_fidelity(apart, "trained_keys") == {"other": "trained_keys", "alignment_difference": None,
                                                           "seeds_without_overlap": [0, 1, 2]}


def test_front_intervals_and_exact_tests():
    import front
    interval = front.mean_interval([0.2, 0.3, 0.4])
    assert interval["mean"] == pytest.approx(0.3)
    assert interval["high"] - interval["mean"] == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2)
    assert front.fisher(0.5, 24, 0.5, 24) == pytest.approx(1.0)
    assert front.fisher(1.0, 24, 0.0, 24) < 1e-10
    assert front.fisher(24 / 48, 48, 20 / 48, 48) == pytest.approx(_fisher_two_sided(24, 48, 20, 48))


def _sampled_front(recipe):
    """A front.json as front.run_front writes it once a recipe passed the learnability check: every setting of
    every method and seed, fidelity falling and alignment rising with beta."""
    import front
    rows = []
    for seed in front.SEEDS:
        for method in front.METHODS:
            for setting in front.settings(method):
                fidelity, alignment = 1.0 - 0.5 * setting["beta"], 0.4 + 0.5 * setting["beta"] - 0.01 * seed
                for prompts in front.PROMPT_SETS:
                    rows.append({"method": method, "seed": seed, "prompts": prompts, **setting, "images": 24,
                                 "fidelity": fidelity, "detected": fidelity, "alignment": alignment,
                                 "background_and_position": alignment, "detected_and_aligned": fidelity * alignment,
                                 **({"size": alignment} if prompts == "small" else {})})
    base = {"fidelity": 0.0, "detected": 0.0, "alignment": 1.0, "size": 1.0, "images": 24}
    learnability = [{"recipe": name, "changes": changes, "training_seconds": 60.0, **base}
                    for name, changes in front.LEARNABILITY.items()]
    return {"concept": front.CONCEPT, "train": front.TRAIN, "sampling": {"seed": 1000, "steps": 16, "cfg": 4.0,
            "sampler": "dpmpp_2m", "scheduler": "karras", "batch": 3}, "seeds": list(front.SEEDS),
            "prompts": {name: [p for p, _ in front.front_prompts(front.CONCEPT, name).values()]
                        for name in front.PROMPT_SETS},
            "size_judge_on_concept": {"images": 240, "accuracy": {"small": 0.99, "big": 1.0}},
            "superclass": {name: base for name in front.PROMPT_SETS}, "learnability": learnability,
            "recipe": recipe, "rows": rows, "base": "base-x", "training_seconds": {"perfusion/seed0": 60.0},
            "seconds": 600.0}


def test_front_report_states_the_recipe_the_front_was_trained_with():
    import front
    import report
    recipe = "learning rates x3.3 and 500 steps"
    changes = front.LEARNABILITY[recipe]
    text = report.front_section(_sampled_front(recipe), "cmd", "machine", "date")
    assert (f"(steps {changes['steps']}, batch {front.TRAIN['batch_size']}, 1 micro-batch per step, "
            f"value_lr {changes['value_lr']:g}, embedding_lr {changes['embedding_lr']:g}, other inputs") in text
    assert f"The front below uses: {recipe}." in text and "### the concept asked for small" in text
    plain = report.front_section(_sampled_front(""), "cmd", "machine", "date")
    assert f"(steps {front.TRAIN['steps']}, batch {front.TRAIN['batch_size']}, 1 micro-batch per step, other" in plain


def _fisher_two_sided(a, n_a, b, n_b):
    """Fisher's exact test from the hypergeometric law: the probability of every table with the same margins
    that is no more likely than the observed one."""
    from math import comb
    total, n = a + b, n_a + n_b
    p = [comb(n_a, k) * comb(n_b, total - k) / comb(n, total) for k in range(max(0, total - n_b), min(n_a, total) + 1)]
    observed = comb(n_a, a) * comb(n_b, b) / comb(n, total)
    return sum(q for q in p if q <= observed * (1 + 1e-9))


def test_diagnosis_reads_back_the_images_of_a_report_figure(tmp_path):
    import diagnose
    import report
    rng = np.random.default_rng(0)
    images = rng.random((12, world.SIZE, world.SIZE, 3)).astype(np.float32)
    report.image_grid([(f"caption {k} " * 6, im) for k, im in enumerate(images)], 8, tmp_path / "grid.png",
                      caption_lines=5)
    tiles = diagnose.figure_tiles((tmp_path / "grid.png").read_bytes(), rows=2)
    assert tiles.shape == (2, 8, world.SIZE, world.SIZE, 3)
    read = tiles.reshape(-1, world.SIZE, world.SIZE, 3)[:12]
    assert np.abs(read - images).max() <= 1 / 255 + 1e-6  # image_grid keeps 8 bits (truncated)


def test_object_masks_cover_exactly_what_render_paints_over_the_background():
    from dataclasses import replace
    for scene in world.concept_training_scenes("tw_circle", seed=7):
        mask, image = world.object_mask(scene), world.render(scene)
        background = world.render(replace(scene, objects=()))
        painted = np.abs(image - background).max(axis=-1) > 1e-6
        assert mask.shape == (world.SIZE, world.SIZE) and 0.0 <= mask.min() and mask.max() == 1.0
        assert np.array_equal(painted, mask > 0)


def test_shape_candidates_keep_what_their_latent_keeps():
    """shape.py's "today's latent" row sees exactly the mosaic VAE's latent (8x8 patch means), and the learned
    fourth channel writes one code per 8x8 patch, from that patch only."""
    import torch
    import base_model
    import shape
    _, images, _ = shape.single_object_scenes(8, seed=3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    latent = base_model.mosaic_latents(images)[:, :3] * 4  # the VAE's latent, unscaled
    expected = latent.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    assert torch.allclose(shape.PatchMeans(8)(x), expected, atol=1e-6)
    assert not torch.allclose(shape.PatchMeans(4)(x), expected, atol=1e-3)
    torch.manual_seed(0)
    code = shape.LearnedPatchCode(1, keep_means=True)
    changed = x.clone()
    changed[:, :, 8:16, 16:24] = torch.rand(8, 3, 8, 8)  # one patch: row 1, column 2
    difference = (code(changed) - code(x)).abs().amax(dim=(0, 1))
    assert difference[8:16, 16:24].min() > 0
    difference[8:16, 16:24] = 0
    assert difference.max() == 0


def test_shape_scores_and_intervals():
    import torch
    import shape
    assert shape.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert shape.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    scenes, images, labels = shape.single_object_scenes(40, seed=4)
    star, circle, square = (shape.SHAPES.index(s) for s in ("star", "circle", "square"))
    predicted = labels.clone()
    stars, circles = (labels == star).nonzero().flatten(), (labels == circle).nonzero().flatten()
    assert len(stars) >= 2 and len(circles) >= 1
    predicted[stars[0]] = circle  # a star read as a circle, another as a square, a circle as a square
    predicted[stars[1]] = square
    predicted[circles[0]] = square

    class Reads(torch.nn.Module):  # a classifier that answers `predicted`, image by image
        def forward(self, x):
            index = [int(np.flatnonzero((images == img.permute(1, 2, 0).numpy()).all(axis=(1, 2, 3)))[0]) for img in x]
            return torch.nn.functional.one_hot(predicted[index], len(shape.SHAPES)).float()
    scores = shape.evaluate(Reads(), images, labels, scenes)
    assert scores["correct"] == 37 and scores["accuracy"] == pytest.approx(37 / 40)
    assert scores["star_read_as_circle"] == pytest.approx(1 / len(stars))
    assert scores["accuracy_star"] == pytest.approx(1 - 2 / len(stars))
    assert scores["circle_read_as_star"] == 0 and scores["accuracy_circle"] == pytest.approx(1 - 1 / len(circles))


@pytest.mark.host
def test_patch_code_encoder_computes_its_filters_exactly():
    """patch_vae's hand-set TAESD encoder applies any four 8x8 patch filters (signed) exactly, and read_filters
    reads them back; a filter entry put at the wrong tap is caught."""
    import torch
    from comfy.taesd.taesd import TAESD
    import patch_vae
    torch.manual_seed(0)
    filters, bias = torch.randn(4, 3, 8, 8) * 0.05, torch.randn(4) * 0.1
    encoder = TAESD().taesd_encoder
    patch_vae.set_patch_encoder(encoder, filters, bias)
    x = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        latent = encoder(x)
    assert torch.allclose(latent, torch.nn.functional.conv2d(x, filters, bias, stride=8), atol=1e-5)
    read, read_bias = patch_vae.read_filters(encoder)
    assert torch.equal(read, filters) and torch.equal(read_bias, bias)
    shifted = filters.clone()
    shifted[:, :, :, 1:], shifted[:, :, :, 0] = filters[:, :, :, :-1], 0  # one pixel to the right
    assert not torch.allclose(latent, torch.nn.functional.conv2d(x, shifted, bias, stride=8), atol=1e-3)
    means = patch_vae.mean_filters()
    assert torch.allclose(torch.nn.functional.conv2d(x, means, stride=8),
                          torch.nn.functional.avg_pool2d(x, 8) * patch_vae.MEAN_SCALE, atol=1e-6)


@pytest.mark.host
def test_patch_code_filters_train_at_their_own_rate_and_their_movement_is_measured():
    """The filters of a patch-code VAE move at filter_lr (REPORT §9: at the decoder's lr they hardly moved), the
    decoder's rate is left alone, and filter_movement measures the distance from the filters' real start (a
    movement that ignores the seed of filter 3's random start is caught)."""
    import torch
    from comfy.taesd.taesd import TAESD
    import patch_vae
    rng = np.random.default_rng(0)
    images, masks = rng.random((4, 48, 48, 3), dtype=np.float32), (rng.random((4, 48, 48)) > 0.5).astype(np.float32)
    encoder = TAESD().taesd_encoder
    patch_vae.set_patch_encoder(encoder, patch_vae.start_filters(torch.Generator().manual_seed(7)) * patch_vae._UNIT,
                              torch.zeros(4))
    assert patch_vae.filter_movement(encoder, 7) == [0.0] * 4
    assert patch_vae.filter_movement(encoder, 8)[3] > 1.0  # another seed's random filter 3
    decoder_start = TAESD().taesd_decoder
    patch_vae._start_decoder(decoder_start, 7)
    moved = {}
    for filter_lr in (None, 3e-2):
        vae, _ = patch_vae.train_patch_taesd(images, masks, steps=3, batch=2, lr=1e-3, seed=7, filter_lr=filter_lr)
        moved[filter_lr] = patch_vae.filter_movement(vae.taesd_encoder, 7)
        # the first conv after the input clamp: Adam's first steps move each weight by about lr, whatever the filters
        moved[filter_lr, "decoder"] = float((vae.taesd_decoder[1].weight - decoder_start[1].weight).detach().norm())
    assert all(0 < m < 0.01 for m in moved[None])
    assert all(fast > 10 * slow for fast, slow in zip(moved[3e-2], moved[None]))
    assert moved[3e-2, "decoder"] == pytest.approx(moved[None, "decoder"], rel=0.2)


def _companion_rows(control: float, single: dict, combined: dict, both: float = 0.0) -> list[dict]:
    """Rows of composition.run_companions: detection rates per beta for one concept with a world object (single),
    the combined set (combined), the control and both concepts in one prompt, 12 images per row, two lockings."""
    rows = []
    for locking in ("local", "global"):
        for beta in (0.4, 0.7):
            for concept in ("tw_circle", "tw_star"):
                rows.append({"locking": locking, "beta": beta, "applied": concept, "prompt": "concept only",
                             "concept": concept, "images": 12, "concept_detected": control})
                rows.append({"locking": locking, "beta": beta, "applied": concept, "prompt": "with a world object",
                             "concept": concept, "images": 12, "concept_detected": single[beta]})
                rows.append({"locking": locking, "beta": beta, "applied": "tw_circle+tw_star",
                             "prompt": "with a world object", "concept": concept, "images": 12,
                             "concept_detected": combined[beta]})
            rows.append({"locking": locking, "beta": beta, "applied": "tw_circle+tw_star", "prompt": "both concepts",
                         "concept": "both", "images": 24, "concept_detected": both})
    return [{**row, "background": 1.0, "two_objects": 0.5} for row in rows]


def test_companions_reading_follows_the_decision_rule():
    """Issue 20's rule, read from counts: concepts not rendered alone blame the world; the combined set failing as
    each concept alone clears the multi-concept path (one failing more does not); recovery at the lower beta is
    the operating point; failure at both betas is locking. A reading with the betas swapped is caught."""
    import report
    operating_point = " ".join(report.companions_reading(_companion_rows(0.75, {0.4: 0.75, 0.7: 0.25},
                                                                          {0.4: 0.75, 0.7: 0.25}, both=0.5)))
    assert "seldom rendered" not in operating_point and "multi-concept path is cleared" in operating_point
    assert "36 of 48 at beta 0.4, 12 of 48 at beta 0.7" in operating_point and "the operating point" in operating_point
    assert "both found in one image in 24 of 48 at beta 0.4, 24 of 48 at beta 0.7" in operating_point
    swapped = " ".join(report.companions_reading(_companion_rows(0.75, {0.4: 0.25, 0.7: 0.75}, {0.4: 0.25, 0.7: 0.75})))
    assert "the operating point" not in swapped and "better at the higher beta" in swapped
    locking = " ".join(report.companions_reading(_companion_rows(0.75, {0.4: 0.0, 0.7: 0.0}, {0.4: 0.0, 0.7: 0.0})))
    assert "fails at both: locking" in locking and "cleared" in locking
    path = " ".join(report.companions_reading(_companion_rows(0.75, {0.4: 0.75, 0.7: 0.75}, {0.4: 0.0, 0.7: 0.0})))
    assert "does worse than each concept alone" in path and "cleared" not in path
    world_ = " ".join(report.companions_reading(_companion_rows(0.25, {0.4: 0.0, 0.7: 0.0}, {0.4: 0.0, 0.7: 0.0})))
    assert "24 of 96 images" in world_ and "seldom rendered even alone" in world_
    assert "cleared" not in world_ and "locking (or" not in world_  # no verdict where the control fails


def test_per_concept_reading_keeps_each_concept_apart():
    """A concept rendered alone beside one never rendered: each gets its own counts (pooling would hide the
    first), the combined set against alone, and the rows with the other's gate kept off against both."""
    import report

    def row(concept, prompt, applied, rate, **extra):
        return {"locking": "local", "beta": 0.4, "applied": applied, "prompt": prompt, "concept": concept,
                "images": 24, "concept_detected": rate, "background": 1.0, "two_objects": 0.5, **extra}
    rows = [row("tw_circle", "concept only", "tw_circle", 0.5), row("tw_star", "concept only", "tw_star", 0.0),
            row("tw_circle", "with a world object", "tw_circle", 0.5),
            row("tw_star", "with a world object", "tw_star", 0.0),
            row("tw_circle", "with a world object", "tw_circle+tw_star", 0.0),
            row("tw_star", "with a world object", "tw_circle+tw_star", 0.0),
            row("both", "both concepts", "tw_circle+tw_star", 0.0),
            row("tw_circle", "with a world object, other's gate kept off", "tw_circle+tw_star", 0.5, other_beta=0.94)]
    from scipy import stats
    text = " ".join(report.per_concept_reading({"rows": rows}))
    half_against_none = stats.fisher_exact([[12, 12], [0, 24]])[1]
    assert ("tw_circle: the control 12 of 24; with a world object, applied alone 12 of 24, with the combined set "
            f"0 of 24 (p = {half_against_none:.2g} against alone), with the other concept's gate kept off its word "
            f"(the other's beta 0.94) 12 of 24 (p = {half_against_none:.2g} against the combined set, 1 against "
            "alone); the combined set costs it what the other concept's gate on its word adds, and keeping that "
            "gate shut gives it back.") in text
    assert "tw_star: the control 0 of 24; with a world object, applied alone 0 of 24, with the combined set 0 of 24" in text
    assert "both:" not in text
    assert "by training seed" not in text  # one seed: nothing to split
    rows[-1] = {**rows[-1], "concept_detected": 0.0}  # keeping the other's gate off gives nothing back
    assert "gives it back" not in " ".join(report.per_concept_reading({"rows": rows}))


def test_per_concept_reading_pools_training_seeds_and_gives_each_seed():
    """With concepts of several training seeds, the reading pools them and lists each seed's counts (applied
    alone, combined, the other's gate kept off), each from that seed's rows only."""
    import report

    def row(seed, prompt, applied, detected, **extra):
        return {"seed": seed, "locking": "local", "beta": 0.4, "applied": applied, "prompt": prompt,
                "concept": "tw_circle", "images": 12, "concept_detected": detected / 12, "background": 1.0,
                "two_objects": 0.5, **extra}
    rows = [r for seed, (alone, combined, kept) in enumerate([(6, 0, 5), (3, 1, 4), (9, 2, 2)])
            for r in (row(seed, "concept only", "tw_circle", alone),
                      row(seed, "with a world object", "tw_circle", alone),
                      row(seed, "with a world object", "tw_circle+tw_star", combined),
                      row(seed, "with a world object, other's gate kept off", "tw_circle+tw_star", kept,
                          other_beta=0.9 + seed / 100))]
    text = " ".join(report.per_concept_reading({"rows": rows}))
    assert ("tw_circle: the control 18 of 36; with a world object, applied alone 18 of 36, with the combined set "
            "3 of 36") in text
    assert "(the other's beta 0.9/0.91/0.92) 11 of 36" in text
    assert ("(by training seed, applied alone, combined, other's gate kept off: seed 0: 6, 0, 5 of 12; "
            "seed 1: 3, 1, 4 of 12; seed 2: 9, 2, 2 of 12).") in text


def test_composition_reading_says_whether_combining_changes_the_edit():
    """§7's token reading follows the numbers: small cross-talk leaves each token what the single concepts give
    it; concepts alike in the metric of C (cross r 0.7, alpha changed by 0.76) do not (the words once fixed are
    caught)."""
    import report

    def composition(cross_r: float, change: float) -> dict:
        def row(word, own):
            other = "tw_star" if own == "tw_circle" else "tw_circle"
            return {"word": word, "per_concept": {own: {"r": 1.0, "g": 0.98}, other: {"r": cross_r, "g": cross_r}},
                    "max_alpha_change": change, "max_gate": [0.9, 0.9]}
        rows = [row("tw_circle", "tw_circle"), row("tw_star", "tw_star"), {**row("other", "tw_circle"), "word": "other"}]
        return {"concepts": ["tw_circle", "tw_star"], "by_beta": {"0.4": {"two concepts": rows}}}
    apart = "; ".join(report._composition_reading(composition(0.1, 0.1)))
    alike = "; ".join(report._composition_reading(composition(0.7, 0.76)))
    assert "r up to 0.10" in apart and "gives each token what the single concepts give it" in apart
    assert "at most 0.76" in alike and "r up to 0.70" in alike and "does not give each token" in alike


def test_composition_section_states_the_concepts_recipe_and_their_vectors():
    """§7 says which recipe trained its concepts (composition.TRAIN, every change to the node's defaults) and the
    plain cosines of their stored vectors."""
    import composition as composition_module
    import report
    a, b = "tw_circle", "tw_star"
    row = {"tokens": 8, "per_concept": {n: {"r": 1.0, "g": 0.9, "alpha_exact": 1.0} for n in (a, b)},
           "max_alpha_change": 0.1, "max_gate": [0.9, 0.2], "max_gate_at": ["concept", "concept"]}
    rows = [{**row, "word": word} for word in (a, b, "other")]
    results = {"concepts": [a, b], "tau": 0.15, "train": composition_module.TRAIN, "metric_cosine": 0.6,
               "metric_cosine_ba": 0.5, "i_star_cosine": 0.81, "i_star_vs_superclass": {a: -0.001, b: -0.05},
               "by_beta": {"0.4": {"two concepts": rows}}, "seconds": 1.0}
    text = report.composition_section(results, "cmd", "machine", "today")
    train = composition_module.TRAIN
    assert (f"steps {train['steps']}, batch {train['batch_size']}, {train['gradient_accumulation']} micro-batch per "
            f"step, value_lr {train['value_lr']:g}, embedding_lr {train['embedding_lr']:g}, masks;") in text
    assert "the two i* 0.81; each i* against its superclass word's encoding i_super tw_circle -0.00, tw_star -0.05" in text


def test_shape_report_reads_the_judges_on_decodes_and_every_seed():
    import report
    row = {"latent": "6x6x3", "description": "today", "n": 100, "train_seconds": 60.0, "accuracy_small": 0.5,
           "accuracy_big": 0.7, "accuracy_star": 0.6, "accuracy_circle": 0.6, "accuracy_square": 0.6,
           "accuracy_triangle": 0.6, "star_read_as_circle": 0.1, "circle_read_as_star": 0.2}
    rows = [{**row, "candidate": "means8", "seed": 0, "accuracy": 0.61, "correct": 61},
            {**row, "candidate": "means8", "seed": 1, "accuracy": 0.65, "correct": 65},
            {**row, "candidate": "means4", "seed": 0, "accuracy": 0.97, "correct": 97}]
    accuracies = {"shape": 0.412, "size": 0.9, "position": 0.9, "background": 0.9, "colour": 0.9}
    vae = {"config": {"kind": "mosaic"}, "recon_l1_256": 0.03, "seconds": 0.0, "judge_seconds": 240.0,
           "attribute_accuracy_vae": accuracies, "attribute_accuracy_clean": {**accuracies, "shape": 0.987},
           "concept_accuracy_vae": {"tw_circle": 0.95, "tw_star": 0.9}}
    fast = {**vae, "config": {"kind": "patch-code", "lr": 1e-3, "filter_lr": 0.03},
            "filter_movement": [0.014, 0.021, 0.5, 0.16]}
    text = report.shape_section({"config": {"train_scenes": 10, "test_scenes": 100, "epochs": 1, "train_seeds": [0, 1]},
                                 "rows": rows, "seconds": 120.0, "vaes": {"mosaic": vae, "fast": fast}},
                                "cmd", "machine", "today")
    assert "| fast | 0.03 | 1.4% / 2.1% / 50.0% / 16.0% |" in text  # its filters' own rate, and how far they moved
    assert "61.0% [" in text and "65.0% [" in text  # every seed, with its interval
    assert "today's latent (63.0%)" in text and "+34.0" in text  # 0.97 - mean(0.61, 0.65)
    assert "41.2%" in text and "98.7%" not in text  # the judges on decodes, not on clean images
