"""Figures (PNG, drawn with Pillow: no plotting dependency) and the tables of REPORT.md, from results.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SCALE = 2  # 48x48 images shown at 96x96


def _font():
    return ImageFont.load_default()


def image_grid(items, columns: int, path: Path, caption_lines: int = 3, width_chars: int = 22) -> None:
    """items: [(caption, image [H, W, 3] in 0..1)]; each image enlarged SCALE x with its caption below."""
    if not items:
        return
    h, w = items[0][1].shape[:2]
    cell_w, text_h = max(w * SCALE, 6 * width_chars), 11 * caption_lines
    rows = (len(items) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (cell_w + 6), rows * (h * SCALE + text_h + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (caption, image) in enumerate(items):
        r, c = divmod(k, columns)
        x, y = c * (cell_w + 6), r * (h * SCALE + text_h + 6)
        tile = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize((w * SCALE, h * SCALE), Image.NEAREST)
        sheet.paste(tile, (x, y))
        words, lines, line = caption.split(), [], ""
        for word in words:
            if len(line) + len(word) + 1 > width_chars and line:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for i, text in enumerate(lines[:caption_lines]):
            draw.text((x, y + h * SCALE + 1 + 11 * i), text, fill="black", font=_font())
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def front_plot(results: dict, path: Path, key: str = "background", ylabel: str = "") -> None:
    """Fidelity (x) against alignment (y: the share of images whose `key` matches the prompt)."""
    W, H, margin = 640, 480, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    sweeps = results["sweeps"]
    if not sweeps:
        return
    xs = [s["fidelity"] for s in sweeps]
    x0, x1 = 0.0, max(1.0, max(xs))
    y0, y1 = 0.0, 1.0
    to = lambda x, y: (margin + (x - x0) / (x1 - x0) * (W - 2 * margin),  # noqa: E731
                       H - margin - (y - y0) / (y1 - y0) * (H - 2 * margin))
    d.rectangle([margin, margin, W - margin, H - margin], outline="black")
    for t in np.linspace(0, 1, 6):
        px, _ = to(x0 + t * (x1 - x0), 0)
        _, py = to(0, y0 + t * (y1 - y0))
        d.line([px, H - margin, px, H - margin + 4], fill="black")
        d.text((px - 10, H - margin + 6), f"{x0 + t * (x1 - x0):.1f}", fill="black", font=_font())
        d.line([margin - 4, py, margin, py], fill="black")
        d.text((margin - 30, py - 5), f"{y0 + t * (y1 - y0):.1f}", fill="black", font=_font())
    d.text((W // 2 - 120, H - 25), "fidelity: mean concept-judge probability", fill="black", font=_font())
    d.text((5, 20), ylabel or f"alignment: {key} as prompted (fraction of images)", fill="black", font=_font())
    styles = {"perfusion": ("blue", "Perfusion, locked keys (beta sweep, tau 0.15)"),
              "trained_keys": ("red", "Perfusion, trained keys (beta sweep, tau 0.15)")}
    legend_y = H // 2
    for method, (colour, label) in styles.items():
        pts = [s for s in sweeps if s["method"] == method and s["tau"] == 0.15]
        pts.sort(key=lambda s: s["beta"])
        coords = [to(s["fidelity"], s[key]) for s in pts]
        if len(coords) > 1:
            d.line(coords, fill=colour, width=2)
        for s, (px, py) in zip(pts, coords):
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
            d.text((px + 5, py - 12), f"b{s['beta']:g}", fill=colour, font=_font())
        d.text((margin + 8, legend_y), label, fill=colour, font=_font())
        legend_y += 12
    for s in sweeps:
        px, py = to(s["fidelity"], s[key])
        if s["method"] == "perfusion" and s["tau"] != 0.15:
            d.rectangle([px - 4, py - 4, px + 4, py + 4], outline="blue", width=2)
            d.text((px + 5, py + 2), f"t{s['tau']:g}", fill="blue", font=_font())
        elif s["method"] == "ti":
            d.polygon([(px, py - 6), (px + 6, py + 5), (px - 6, py + 5)], fill="green")
        elif s["method"] == "superclass":
            d.polygon([(px, py - 6), (px + 6, py), (px, py + 6), (px - 6, py)], fill="gray")
    d.text((margin + 8, legend_y), "squares: locked keys, beta 0.7, other tau", fill="blue", font=_font())
    d.text((margin + 8, legend_y + 12), "green triangle: textual inversion", fill="green", font=_font())
    d.text((margin + 8, legend_y + 24), "grey diamond: base model, plain superclass word", fill="gray", font=_font())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def loss_plot(losses, path: Path, title: str) -> None:
    W, H, margin = 640, 300, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    k = max(1, len(losses) // 200)
    smooth = [float(np.mean(losses[i:i + k])) for i in range(0, len(losses), k)]
    lo, hi = min(smooth), max(smooth)
    pts = [(margin + i / max(1, len(smooth) - 1) * (W - 2 * margin),
            H - margin - (v - lo) / max(1e-9, hi - lo) * (H - 2 * margin)) for i, v in enumerate(smooth)]
    d.rectangle([margin, margin, W - margin, H - margin], outline="black")
    d.line(pts, fill="blue", width=2)
    d.text((margin, 10), title, fill="black", font=_font())
    d.text((5, margin - 5), f"{hi:.3f}", fill="black", font=_font())
    d.text((5, H - margin - 5), f"{lo:.3f}", fill="black", font=_font())
    d.text((W - margin - 40, H - margin + 8), f"{len(losses)} steps", fill="black", font=_font())
    img.save(path)


def write_figures(folder: Path, results, base_examples, sweep_examples, two_examples) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image_grid(base_examples, 8, folder / "base_samples.png")
    front_plot(results, folder / "front.png", "background", "alignment: background as prompted (share of images)")
    front_plot(results, folder / "front_background_and_position.png", "alignment",
               "alignment: background and position as prompted (share of images)")
    chosen = ["base model, superclass word", "textual inversion", "perfusion beta 0.7 tau 0.15",
              "trained keys beta 0.7 tau 0.15", "perfusion beta 0.4 tau 0.15", "perfusion beta 1.2 tau 0.15"]
    for concept in sorted({c for ex in sweep_examples.values() for c in ex}):
        items = []
        for label in chosen:
            for text, image in sweep_examples.get(label, {}).get(concept, []):
                items.append((f"[{label}] {text}", image))
        image_grid(items, 8, folder / f"contexts_{concept}.png", caption_lines=5)
    items = [(f"[{m}] {t}", im) for m, ex in two_examples.items() for t, im in ex]
    image_grid(items, 8, folder / "two_concepts.png", caption_lines=5)


def world_figures(folder: Path) -> None:
    import world
    scenes, images = world.world_dataset(16, seed=2)  # the first base-training scenes (same seed as training)
    image_grid([(s.caption, im) for s, im in zip(scenes, images)], 8, folder / "world_samples.png", caption_lines=4)
    image_grid([(s.caption, mosaic(im)) for s, im in zip(scenes, images)], 8, folder / "world_samples_vae.png",
               caption_lines=4)
    items = []
    for name in sorted(world.CONCEPTS):
        for s in world.concept_training_scenes(name, seed=7):
            items.append((f"{name} photo ({s.background})", world.render(s)))
    items += [(f"{caption}, through the VAE", mosaic(im)) for caption, im in items]
    image_grid(items, 8, folder / "concept_photos.png", caption_lines=3)


def mosaic(image: np.ndarray) -> np.ndarray:
    """What the checkpoint's VAE (base_model.mosaic_taesd) returns for an image: 8x8 patch means."""
    h, w, _ = image.shape
    means = image.reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))
    return means.repeat(8, axis=0).repeat(8, axis=1)


def _pct(x):
    return "–" if x is None else f"{100 * x:.0f}%"


def _interp(points, x):
    """Linear interpolation of y at x on a curve of (x, y) points sorted by x; None outside its range."""
    points = sorted(points)
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        if xa <= x <= xb:
            return ya if xb == xa else ya + (yb - ya) * (x - xa) / (xb - xa)
    return None


def equal_fidelity_table(sweeps, key: str = "background") -> list[tuple]:
    """Alignment (`key`) of locked and trained keys at the same fidelity, interpolated along each beta sweep."""
    curve = lambda m: [(s["fidelity"], s[key]) for s in sweeps if s["method"] == m and s["tau"] == 0.15]  # noqa: E731
    locked, trained = curve("perfusion"), curve("trained_keys")
    if not locked or not trained:
        return []
    lo = max(min(x for x, _ in locked), min(x for x, _ in trained))
    hi = min(max(x for x, _ in locked), max(x for x, _ in trained))
    rows = []
    if lo < hi:
        for x in np.linspace(lo, hi, 5):
            rows.append((float(x), _interp(locked, x), _interp(trained, x)))
    return rows


def write_report(path: Path, results: dict, stages: dict, command: str, machine: str, narrative: str = "") -> None:
    b = results["base"]
    j = results["judges"]
    results.setdefault("covariance", {"fingerprint": "?", "relative_difference_vs_pack_estimator_32_captions": float("nan")})
    lines = []
    w = lines.append
    w("# Toy world: evidence that Perfusion works (issue 8)\n")
    w("All numbers below are produced by one command and are reproducible with the fixed seeds listed; "
      "`experiments/toy_world/REPORT.md` is regenerated by it.\n")
    w("```\n" + command + "\n```\n")
    w(f"Machine: {machine}. Stage wall times (first, uncached run; the machine was shared with other "
      "developers' jobs, so times are upper bounds):\n")
    w("| stage | wall time |\n|---|---|")
    for name, seconds in stages.items():
        w(f"| {name} | {seconds / 60:.1f} min |" if seconds is not None else f"| {name} | cached |")
    w("")
    if narrative:
        w(narrative)
    w("## 1. The world\n")
    w("48x48 images (geometry on a 64-unit canvas, 3x3 supersampled): one or two objects from 4 superclasses "
      "(`star`, `circle`, `square`, `triangle`: one CLIP token each, checked by tests/test_toy_world.py), "
      "6 colours, 3 patterns (plain, striped, dotted), 2 sizes, 3 positions (left / center / right), on 6 "
      "background scenes (`grass`, `sand`, `sky`, `night`, `snow`, `brick`). Captions come from a small grammar "
      "(`world.py`, parsed back by `world.parse_caption`). Two held-out concepts never appear in base training: "
      "`tw_star` (a star, cyan top half, magenta bottom half) and `tw_circle` (a circle, lime ring, indigo core). "
      "Their 4 training photos show them big, in the centre, on sand or snow only.\n")
    w("![world](figures/world_samples.png)\n")
    w("The same scenes as the checkpoint's VAE encodes and decodes them (what the UNet learns and what every "
      "generated image looks like):\n")
    w("![world through the VAE](figures/world_samples_vae.png)\n")
    w("![concept photos](figures/concept_photos.png)\n")
    w("## 2. The base model follows its prompts\n")
    w(f"Generated by ComfyUI's KSampler ({results['sampling']['sampler']}/{results['sampling']['scheduler']}, "
      f"{results['sampling']['steps']} steps, cfg {results['sampling']['cfg']}) from the checkpoint loaded by the stock "
      f"CheckpointLoaderSimple; {b['images']['single']} single-object images ({b['images']['single'] // 2} prompts "
      "with every attribute written, 2 seeds each) read by the attribute judge:\n")
    w("| attribute | agrees with the prompt | chance |\n|---|---|---|")
    for a in ("background", "position", "shape", "colour", "size"):
        w(f"| {a} | {_pct(b[a + '_rate'])} | {_pct(b['chance'][a])} |")
    w(f"| background and position | {_pct(b['background_and_position_rate'])} | {_pct(1 / 18)} |")
    w(f"| all five | {_pct(b['all_five_rate'])} | {100 * b['chance']['all_five']:.2f}% |")
    w(f"\nTwo-object prompts ({b['images']['two_objects']} images): background {_pct(b['two_object_background_rate'])}, "
      f"judged to hold two objects {_pct(b['two_object_count_rate'])}.\n")
    w("![base samples](figures/base_samples.png)\n")
    w("![base loss](figures/base_loss.png)\n")
    w("## 3. The judges\n")
    w("Accuracy on 600 held-out rendered scenes (new seed), clean and after a VAE round trip "
      "(generated images pass through the same decoder):\n")
    w("| judge | clean | through the VAE |\n|---|---|---|")
    for k in j.get("attribute_accuracy_clean", {}):
        w(f"| attribute: {k} | {_pct(j['attribute_accuracy_clean'][k])} | {_pct(j['attribute_accuracy_vae'][k])} |")
    for k in j.get("concept_accuracy_clean", {}):
        w(f"| concept: {k} present? | {_pct(j['concept_accuracy_clean'][k])} | {_pct(j['concept_accuracy_vae'][k])} |")
    w("")
    w("## 4. Personalisation: fidelity against alignment\n")
    t = results["train"]
    # Runs before the recipe was recorded apart (results["recipe"]) kept every setting in results["train"].
    recipe = results.get("recipe") or {"value_lr": t["value_lr"], "embedding_lr": t["embedding_lr"],
                                       "beta": t["train_beta"], "tau": t["train_tau"], "gradient_accumulation": 1}
    w(f"Each concept is trained from its 4 photos by PerfusionTrainConcept (steps {t['steps']}, batch {t['batch_size']} "
      f"x {recipe.get('gradient_accumulation', 1)} micro-batches, value_lr {recipe['value_lr']}, embedding_lr "
      f"{recipe['embedding_lr']}, train beta/tau {recipe['beta']}/{recipe['tau']}, seed {t['seed']}), three ways: Perfusion with locked keys (`train_values` on, `train_keys` off: the pack's "
      "default), Perfusion with trained keys (`train_keys` on), and textual inversion (`train_values` off: word "
      "vector only, applied with strength 0 so the model is untouched). Covariance: the pack's own cache entry "
      f"for this CLIP (fingerprint {results['covariance']['fingerprint']}; computed through the exact context shortcut, "
      f"relative difference to the pack's estimator on 32 captions {results['covariance']['relative_difference_vs_pack_estimator_32_captions']:.1e}).\n")
    secs = results["concepts"]["seconds"]
    w("Training wall time per concept: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items() if v) + ".\n")
    w("Evaluation: prompts `a embedding:<concept> on <bg>, on the <pos>` for the 4 backgrounds and 2 positions "
      f"the photos never show, {results['sampling']['batch']} seeds each, both concepts: "
      "**fidelity** = mean probability the concept judge gives the concept; **detected** = share with "
      "probability > 0.5; **alignment** = share whose background and position both match the prompt.\n")
    w("| setting | fidelity | detected | alignment | background | position | images |\n|---|---|---|---|---|---|---|")
    for s in results["sweeps"]:
        w(f"| {s['label']} | {s['fidelity']:.3f} | {_pct(s['detected'])} | {_pct(s['alignment'])} | "
          f"{_pct(s['background'])} | {_pct(s['position'])} | {s['images']} |")
    w("\nPer concept (fidelity / alignment):\n")
    names = sorted(k for k in results["sweeps"][0] if k.startswith("tw_")) if results["sweeps"] else []
    w("| setting | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for s in results["sweeps"]:
        w(f"| {s['label']} | " + " | ".join(f"{s[n]['fidelity']:.3f} / {_pct(s[n]['alignment'])}" for n in names) + " |")
    w("\n![front](figures/front.png)\n")
    w("![front, background and position](figures/front_background_and_position.png)\n")
    if results.get("gate_inputs"):
        w("### The gate input of each concept's own token\n")
        w("r = u^T x / u^T i* for the concept's token x in the evaluation prompts (position 2; its range over "
          "positions 1-10 in brackets), and its gate sigmoid((r - beta) / 0.15) at each swept beta. The gate is "
          "built for r near 1: r far below beta shuts the edit off, r far above it saturates the gate, and either "
          "way the beta/tau knob has nothing to move.\n")
        betas = list(results["gate_inputs"][0]["gate"])
        w("| method | concept | r | " + " | ".join(f"gate at beta {b}" for b in betas) + " |\n|---|---|---|"
          + "---|" * len(betas))
        for g in results["gate_inputs"]:
            w(f"| {g['method']} | {g['concept']} | {g['r']:.2f} [{g['r_min']:.2f}, {g['r_max']:.2f}] | "
              + " | ".join(f"{g['gate'][b]:.2f}" for b in betas) + " |")
        w("")
    w("### Key-locking against trained keys at equal fidelity\n")
    for key, what in (("background", "background"), ("alignment", "background and position")):
        rows = equal_fidelity_table(results["sweeps"], key)
        if rows:
            w(f"Alignment ({what}) interpolated along each beta sweep (tau 0.15) at the same fidelity:\n")
            w("| fidelity | locked keys | trained keys |\n|---|---|---|")
            for x, a, c in rows:
                w(f"| {x:.3f} | {_pct(a)} | {_pct(c)} |")
            w("")
        else:
            w(f"Alignment ({what}): the two beta sweeps do not overlap in fidelity, so no equal-fidelity comparison "
              "can be interpolated; see the table above.\n")
    w("")
    for name in names:
        w(f"![contexts {name}](figures/contexts_{name}.png)\n")
    w("## 5. Two concepts in one image, and a concept with a companion\n")
    w("PerfusionCombineConcepts (tw_circle + tw_star) -> one PerfusionApplyConcept (beta 0.7, tau 0.15; strength 0 "
      "for textual inversion). Prompts `a embedding:A and a embedding:B on <bg>` (both orders, 4 unseen "
      "backgrounds) and `a embedding:A and a <colour> <shape> on <bg>`.\n")
    w("| method | tw_circle detected | tw_star detected | both | background | two objects | both + background | "
      "companion prompts: concept detected | background | two objects |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results["two_concepts"]:
        tc, wc = r["two_concepts"], r["with_companion"]
        w(f"| {r['method']} | {_pct(tc['tw_circle_detected'])} | {_pct(tc['tw_star_detected'])} | "
          f"{_pct(tc['both_detected'])} | {_pct(tc['background'])} | {_pct(tc['two_objects'])} | "
          f"{_pct(tc['both_and_background'])} | {_pct(wc['concept_detected'])} | {_pct(wc['background'])} | "
          f"{_pct(wc['two_objects'])} |")
    w("\n![two concepts](figures/two_concepts.png)\n")
    path.write_text("\n".join(lines) + "\n")


GATES_HEADING = "## 6. Gate calibration with the current recipe and corpus"


def gates_section(gates: dict, command: str, machine: str, date: str) -> str:
    """The gate calibration of gates.py (issues 15 and 16): spectrum of C, recorded gate input, leak."""
    spectrum = gates["spectrum"]
    lines = [GATES_HEADING, "",
             f"`{command} --until gates`, {date}; {machine}. No sampling and no judges: the Perfusion concepts "
             f"(circle and star) trained by the train node with the current recipe ({gates['recipe']['gradient_accumulation']} "
             f"micro-batches of {gates['train']['batch_size']} per step, {gates['train']['steps']} steps; the file's i* "
             "is the finished word's encoding) and the covariance of the shipped corpus, on the base model of this "
             "run. Sections 1-5 come from the earlier run named at the top (older recipe, corpus without "
             "vocabulary tails).", "",
             "Spectrum of C on the world's CLIP-L (share of eigenvalues within 10x of the floor RIDGE x mean "
             "eigenvalue, i.e. directions held up by the ridge rather than by captions):", "",
             "| corpus | captions | eigenvalues within 10x of the floor |", "|---|---|---|"]
    names = {"before": "prompts only (before)", "shipped": "with vocabulary tails (shipped)"}
    for key, row in spectrum.items():
        lines.append(f"| {names.get(key, key)} | {row['captions']} | {row['near_floor_share']:.1%} |")
    lines += ["", "Gate on held-out world prompts at the default beta 0.70, tau 0.15 (other backgrounds and positions, "
              "next to a world object, next to the other concept). Leak: share of the prompts' other tokens (BOS "
              "through EOS) whose gate opens (> 0.5); goal below 1% with the concept's own gate above 0.9. The same "
              "trained concept is measured with u = C⁻¹ i* from either corpus's C. `gate_input` is what training "
              "recorded (r of the word in the pack's own check prompts; goal within 0.1 of 1).", "",
              "| concept | gate_input (training) | u from corpus | own r | own gate | leak | other tokens | own r over the training templates (min-max) |",
              "|---|---|---|---|---|---|---|---|"]
    for row in gates["concepts"]:
        for key, m in row["corpora"].items():
            low, high = m["own_r_templates_range"]
            lines.append(f"| {row['concept']} | {row['gate_input_recorded']:.3f} | {names.get(key, key)} | "
                         f"{m['own_r']:.3f} | {m['own_gate']:.3f} | {m['leak']:.2%} | {m['other_tokens']} | "
                         f"{low:.3f}-{high:.3f} |")
    examples = [(row["concept"], key, e) for row in gates["concepts"] for key, m in row["corpora"].items()
                for e in m["leaking_examples"][:2]]
    if examples:
        lines += ["", "Examples of open gates on other tokens (prompt, token position, r):", ""]
        lines += [f"- {concept}, u from {names.get(key, key)}: `{e[0]}`, position {e[1]}, r = {e[2]:.2f}"
                  for concept, key, e in examples]
    seconds = gates.get("seconds_training") or {}
    # gates.json of runs before 2026-12-03's fix timed training and measurement together as "seconds_measurement"
    measured = ("measurement", gates["seconds_measurement_only"]) if "seconds_measurement_only" in gates else \
        ("training and measurement together", gates["seconds_measurement"])
    lines += ["", "Wall time: covariance and spectra {:.1f} min; training {}; {} {:.1f} min.".format(
        gates["seconds_covariance"] / 60,
        ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items() if v) or "cached",
        measured[0], measured[1] / 60), ""]
    return "\n".join(lines)


def replace_narrative(path: Path, narrative: str) -> None:
    """Put the hand-written narrative (narrative.md) in place of the one in the report: everything between the
    header's stage table and section 1, as write_report places it."""
    text = path.read_text()
    start, end = text.find("\n## "), text.find("\n## 1. The world")
    if start < 0 or end < start:
        raise ValueError(f"{path} has no narrative before '## 1. The world'")
    path.write_text(text[:start + 1] + narrative.rstrip("\n") + "\n" + text[end:])


def replace_section(path: Path, heading: str, body: str) -> None:
    """Put `body` (which starts with `heading`) in place of that section of the Markdown file, or at its end."""
    text = path.read_text()
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body.rstrip("\n") + "\n\n" + (text[end + 1:] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")


COMPOSITION_HEADING = "## 7. Two concepts in one prompt, token by token (no sampling)"


def companions_lines(companions: dict, command: str) -> list[str]:
    """The sampled companion prompts (composition.run_companions): each concept alone against the combined set,
    and both concepts in one prompt."""
    sampling = companions["sampling"]
    lines = [f"Sampled (`{command} --until companions`): the companion prompts `a embedding:A and a <colour> "
             f"<shape> on <bg>` ({sampling['steps']} steps, {sampling['sampler']}/{sampling['scheduler']}, cfg "
             f"{sampling['cfg']}, {sampling['batch']} images per prompt), each concept applied alone or with the "
             "other (combined, exact mode); the control `a embedding:A on <bg>` with the concept alone; with both "
             "applied, the prompt `a embedding:A and a embedding:B on <bg>` in both orders (concept \"both\": both "
             "found in one image); and, as the apply node's warning advises, each concept's companion prompts with "
             "the other concept chained after it at a beta raised to its gate input on this concept's word plus 2 "
             "tau (\"other's gate kept off\"; gate there 0.12). Read by the concept judge of §3 (detected: p > 0.5) "
             "and the attribute judge. The concepts were trained with each of the training seeds "
             f"{', '.join(str(seed) for seed in companions.get('seeds', [0]))} (the token tables above: seed "
             f"{companions['train']['seed']}).", "",
             "| training seed | key-locking | beta | applied | prompt | concept | images | concept detected | background "
             "| two objects |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in companions["rows"]:
        other_beta = f" (the other at beta {row['other_beta']:g})" if "other_beta" in row else ""
        lines.append(f"| {row.get('seed', 0)} | {row['locking']} | {row['beta']:g} | {row['applied']}{other_beta} | "
                     f"{row['prompt']} | {row['concept']} | "
                     f"{row['images']} | "
                     f"{row['concept_detected']:.0%} | {row['background']:.0%} | {row['two_objects']:.0%} |")
    lines += ["", "Reading (the decision rule of issue 20's first step, on counts pooled over both key-lockings and "
              "both concepts; Fisher's exact test): " + " ".join(companions_reading(companions["rows"])), "",
              "Per concept (pooled over both key-lockings, betas and training seeds): "
              + " ".join(per_concept_reading(companions)), "",
              f"Wall time of the sampled part: {companions['seconds'] / 60:.1f} min.", ""]
    return lines


def per_concept_reading(companions: dict) -> list[str]:
    """Each concept on its own: the control, its companion prompts applied alone, with the combined set, and
    with the other concept's gate kept off its word (its beta raised above its gate input there, as the apply
    node's warning advises). Pooling both concepts hides a concept that is rendered behind one that is not."""
    import front as front_module
    rows = companions["rows"]
    seeds = sorted({r.get("seed", 0) for r in rows})

    def count(concept: str, prompt: str, combined: bool | None = None, seed: int | None = None):
        picked = [r for r in rows if r["concept"] == concept and r["prompt"] == prompt
                  and (combined is None or ("+" in r["applied"]) == combined)
                  and (seed is None or r.get("seed", 0) == seed)]
        return sum(round(r["concept_detected"] * r["images"]) for r in picked), sum(r["images"] for r in picked)

    def p(a, b):
        return front_module.fisher(a[0] / a[1], a[1], b[0] / b[1], b[1])

    text = []
    for concept in sorted({r["concept"] for r in rows if r["concept"] != "both"}):
        control, alone = count(concept, "concept only"), count(concept, "with a world object", False)
        combined = count(concept, "with a world object", True)
        kept = count(concept, "with a world object, other's gate kept off")
        sentence = (f"{concept}: the control {control[0]} of {control[1]}; with a world object, applied alone "
                    f"{alone[0]} of {alone[1]}, with the combined set {combined[0]} of {combined[1]} (p = "
                    f"{p(alone, combined):.2g} against alone)")
        if kept[1]:
            others = sorted({r["other_beta"] for r in rows if r["concept"] == concept and "other_beta" in r})
            sentence += (f", with the other concept's gate kept off its word (the other's beta "
                         f"{'/'.join(f'{b:g}' for b in others)}) {kept[0]} of {kept[1]} (p = {p(combined, kept):.2g} "
                         f"against the combined set, {p(alone, kept):.2g} against alone)")
            if p(alone, combined) < 0.05 and p(combined, kept) < 0.05 and p(alone, kept) >= 0.05:
                sentence += ("; the combined set costs it what the other concept's gate on its word adds, and "
                             "keeping that gate shut gives it back")
        if len(seeds) > 1:
            settings = [("with a world object", False), ("with a world object", True)] + (
                [("with a world object, other's gate kept off", None)] if kept[1] else [])
            by_seed = []
            for seed in seeds:
                counts = [count(concept, prompt, combined, seed) for prompt, combined in settings]
                by_seed.append(f"seed {seed}: {', '.join(str(k) for k, _ in counts)} of {counts[0][1]}")
            sentence += (" (by training seed, applied alone, combined" + (", other's gate kept off" if kept[1] else "")
                         + ": " + "; ".join(by_seed) + ")")
        text.append(sentence + ".")
    return text


def companions_reading(rows: list[dict]) -> list[str]:
    """What the companion experiment says, by issue 20's rule: a concept that is not rendered even alone leaves
    the world to blame; else the combined set failing as each concept alone does clears the multi-concept path,
    a concept that recovers at the lower beta points to the operating point, one that fails at both to locking."""
    import front as front_module

    def count(prompt: str, combined: bool | None = None, beta: float | None = None, concept: str | None = None):
        picked = [r for r in rows if r["prompt"] == prompt and (combined is None or ("+" in r["applied"]) == combined)
                  and (beta is None or r["beta"] == beta) and (concept is None or r["concept"] == concept)]
        return sum(round(r["concept_detected"] * r["images"]) for r in picked), sum(r["images"] for r in picked)

    def p(a, b):
        return front_module.fisher(a[0] / a[1], a[1], b[0] / b[1], b[1])

    betas = sorted({r["beta"] for r in rows})
    low, high = betas[0], betas[-1]
    control = count("concept only")
    text = [f"The control, each concept alone in its prompt, is detected in {control[0]} of {control[1]} images."]
    world_fails = control[0] < control[1] / 2
    if world_fails:
        text.append("The concepts are seldom rendered even alone, so the counts below decide nothing: neither the "
                    "multi-concept path, nor the operating point, nor locking can be told from the world's failure "
                    "(or the concepts' training).")
    single, combined = count("with a world object", False), count("with a world object", True)
    text.append(f"With a world object in the prompt: {single[0]} of {single[1]} with one concept applied, "
                f"{combined[0]} of {combined[1]} with both (p = {p(single, combined):.2g}).")
    if not world_fails and p(single, combined) >= 0.05:
        text.append("The combined set does as each concept alone does: the multi-concept path is cleared.")
    elif not world_fails:
        text.append("The combined set does " + ("worse" if combined[0] / combined[1] < single[0] / single[1] else
                                               "better") + " than each concept alone: the multi-concept path matters.")
    at_low, at_high = count("with a world object", False, low), count("with a world object", False, high)
    if p(at_low, at_high) < 0.05:
        verdict = ("it recovers at the lower beta: the operating point" if at_low[0] / at_low[1] > at_high[0] / at_high[1]
                   else "it does better at the higher beta, against the gate's trade-off")
    elif max(at_low[0] / at_low[1], at_high[0] / at_high[1]) < 0.5:
        verdict = "it fails at both: locking (or the world)"
    else:
        verdict = "no beta effect is shown"
    text.append(f"One concept with a world object: {at_low[0]} of {at_low[1]} at beta {low:g}, {at_high[0]} of "
                f"{at_high[1]} at beta {high:g} (p = {p(at_low, at_high):.2g})" + ("." if world_fails else f"; {verdict}."))
    both = {beta: count("both concepts", beta=beta, concept="both") for beta in betas}
    if any(n for _, n in both.values()):
        text.append("Both concepts in one prompt: both found in one image in " + ", ".join(
            f"{k} of {n} at beta {beta:g}" for beta, (k, n) in both.items()) + ".")
    return text


def composition_section(composition: dict, command: str, machine: str, date: str, companions: dict | None = None) -> str:
    """Issue 20's first step (composition.py): r, g and α per token under the combined patch against alone."""
    a, b = composition["concepts"]
    lines = [COMPOSITION_HEADING, "",
             f"`{command} --until composition`, {date}; {machine}. No sampling: the Perfusion concepts "
             f"({a}, {b}) trained on this base by the train node ({_recipe_text(composition['train'])}; "
             "composition.TRAIN, §8's strongest recipe), the composition prompts of §5 encoded "
             "by the world's CLIP with both concepts, and for every "
             f"token (BOS through EOS) each concept's gate input r, gate g (tau {composition['tau']:g}) and removal "
             "coefficient alpha: alone (alpha = r), combined in exact mode (alpha = G^-1 s), combined in approximate "
             "mode (alpha = r, as alone). A concept's gate depends only on that concept, so combining changes a "
             "token's edit only through alpha (exact mode) and through the other concept's gate opening there.", "",
             f"How alike the concepts look in the metric of C: G_ab / sqrt(G_aa G_bb) = "
             f"{composition['metric_cosine']:.3f} ({composition['metric_cosine_ba']:.3f} the other way; 0 would make "
             "exact and approximate mode equal)." + _vector_cosines_text(composition), ""]
    for beta, kinds in composition["by_beta"].items():
        lines += [f"beta {beta}:", "",
                  f"| prompts | token | tokens | r {a} | g {a} | alpha {a} (exact) | r {b} | g {b} | alpha {b} (exact) "
                  "| largest change of alpha by combining | largest gate of each concept |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind, rows in kinds.items():
            for row in rows:
                pa, pb = row["per_concept"][a], row["per_concept"][b]
                lines.append(f"| {kind} | {row['word']} | {row['tokens']} | {pa['r']:.2f} | {pa['g']:.2f} | "
                             f"{pa['alpha_exact']:.2f} | {pb['r']:.2f} | {pb['g']:.2f} | {pb['alpha_exact']:.2f} | "
                             f"{row['max_alpha_change']:.3f} | {row['max_gate'][0]:.2f} / {row['max_gate'][1]:.2f}"
                             + (f" ({' / '.join(row['max_gate_at'])})" if row["word"] == "other" else "") + " |")
        lines.append("")
    lines += ["Reading, from the tables: " + "; ".join(_composition_reading(composition)) + ".", ""]
    if companions is not None:
        lines += companions_lines(companions, command)
    lines.append(f"Wall time of the token tables: {composition['seconds'] / 60:.1f} min (with the concepts' training, "
                 "unless the cache had them).")
    return "\n".join(lines) + "\n"


def _vector_cosines_text(composition: dict) -> str:
    """The plain cosines of the concepts' stored vectors (absent from runs before 2026-12-04)."""
    if "i_star_cosine" not in composition:
        return ""
    return (f" Plain cosines of the stored vectors: the two i* {composition['i_star_cosine']:.2f}; each i* against "
            "its superclass word's encoding i_super " + ", ".join(
                f"{name} {value:.2f}" for name, value in composition["i_star_vs_superclass"].items()) + ".")


def _composition_reading(composition: dict) -> list[str]:
    """What the per-token tables say, as numbers: own gates, cross gates, the largest change of alpha."""
    a, b = composition["concepts"]
    out = []
    for beta, kinds in composition["by_beta"].items():
        rows = [row for rows in kinds.values() for row in rows]
        own = [row["per_concept"][row["word"]]["g"] for row in rows if row["word"] in (a, b)]
        cross = [row["per_concept"][b if row["word"] == a else a]["g"] for row in rows if row["word"] in (a, b)]
        other = max(max(row["max_gate"]) for row in rows if row["word"] == "other")
        out.append(f"at beta {beta} each concept's word opens its own gate at {min(own):.2f}-{max(own):.2f} on "
                   f"average and the other concept's at {min(cross):.2f}-{max(cross):.2f}, and the largest gate on "
                   f"any other token is {other:.2f}")
    rows = [row for kinds in composition["by_beta"].values() for rows in kinds.values() for row in rows]
    change = max(row["max_alpha_change"] for row in rows)
    cross_r = max(row["per_concept"][b if row["word"] == a else a]["r"] for row in rows if row["word"] in (a, b))
    out.append(f"combining (exact mode) changes any token's alpha by at most {change:.2f} against the concepts "
               f"alone (at each concept's word it takes out the other concept's share: r up to {cross_r:.2f})")
    if change <= 0.15:
        out.append("so on these prompts the joint patch gives each token what the single concepts give it, up to "
                   "that cross-talk")
    else:
        out.append("so on these prompts combining changes the edit: the two concepts look alike in the metric of C, "
                   "each one's gate opens on the other's word, and the joint patch does not give each token what "
                   "the single concepts give it")
    return out


FRONT_HEADING = "## 8. The fidelity/alignment front: the concept asked for small, three training seeds"


def _interval(x: dict, pct: bool = True) -> str:
    """A rate or probability: mean [interval], the interval cut to 0..1."""
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.2f}")
    return f"{f(x['mean'])} [{f(max(0.0, x['low']))}, {f(min(1.0, x['high']))}]"


def _difference(x: dict | None) -> str:
    """An alignment difference between methods (front.equal_fidelity), with its value in each seed."""
    return "no overlap" if x is None else (_signed(x) + " (per seed: "
                                           + ", ".join(f"{100 * v:+.0f}" for v in x["per_seed"]) + ")")


SET_TITLES = {"small": "the concept asked for small (its photos show it big)",
              "contexts": "the concept in unseen contexts, no size asked (the prompts of §4)"}
SET_ALIGNMENT = {"small": "size, background and position as prompted", "contexts": "background and position as prompted"}


def front_sweeps(front: dict, prompt_set: str) -> list[dict]:
    """The settings averaged over seeds, in the form front_plot reads (and the superclass word's point)."""
    import front as front_module
    table = front_module.analyse(front, prompt_set)["table"]
    return ([{"method": s["method"], "beta": s["beta"], "tau": s["tau"], "fidelity": s["fidelity"]["mean"],
              "alignment": s["alignment"]["mean"]} for s in table]
            + [{"method": "superclass", "beta": 0.0, "tau": 0.0, **front["superclass"][prompt_set]}])


def front_section(front: dict, command: str, machine: str, date: str, diagnosis: dict | None = None,
                  base_names: dict | None = None) -> str:
    """Issue 20 items 3 and 4 (front.py): per prompt set, the settings table, the knob, and locked keys against
    the baselines at equal fidelity."""
    sampling = front["sampling"]
    changes = _front_recipe_changes(front)
    train = {**front["train"], **changes}  # what the front's concepts were trained with
    other_changes = _changes_text({k: v for k, v in changes.items() if k not in TRAIN_SENTENCE_KEYS})
    seeds = ", ".join(str(s) for s in front["seeds"])
    times = [s for s in front["training_seconds"].values() if s]
    size_judge = front["size_judge_on_concept"]
    small = front["prompts"]["small"]
    lines = [FRONT_HEADING, "",
             f"`{command} --until front`, {date}; {machine}.", "",
             "Training times are wall times on the shared 2-core machine (other jobs ran beside some of them).", "",
             f"The experiment (front.py): the concept `{front['concept']}` trained from its 4 photos (big, centre, sand or snow) by "
             f"PerfusionTrainConcept with training seeds {seeds} (steps {train['steps']}, batch {train['batch_size']}, "
             f"{train['gradient_accumulation']} micro-batch per step"
             + (f", {other_changes}" if other_changes else "") + ", other inputs at their defaults), three ways as in "
             f"§4. Two prompt sets, each the 8 combinations of 4 unseen backgrounds and left/right "
             f"({sampling['batch']} images per prompt, {sampling['steps']} steps, {sampling['sampler']}/"
             f"{sampling['scheduler']}, cfg {sampling['cfg']}, the same KSampler seeds for every setting): "
             f"`{small[0]}`, which asks for what the photos contradict, and `{front['prompts']['contexts'][0]}`. "
             "**Fidelity**: the concept judge's mean probability; **detected**: p > 0.5; **alignment**: every "
             "attribute the prompt asks for (size, background, position) read as asked by the attribute judge; "
             "**joint**: detected and aligned.", "",
             f"The attribute judge reads the size of the concept itself (never in its training data) through the "
             f"decoder correctly in {size_judge['accuracy']['small']:.0%} of small and "
             f"{size_judge['accuracy']['big']:.0%} of big renders ({size_judge['images']} renders).", "",
             "Each cell: mean over the seeds, and its 95% interval (t over seeds, cut to 0..1) in brackets. Fisher's "
             "exact tests pool the images of all seeds, so they treat images as independent; the intervals over "
             "seeds do not.", ""]
    lines += _learnability_lines(front, base_names or {})
    if diagnosis is not None:
        lines += _diagnosis_lines(diagnosis, command)
    if front.get("recipe") is not None:
        for prompt_set in front["prompts"]:
            lines += _front_set_lines(front, prompt_set)
    lines.append(f"Wall time: {front['seconds'] / 60:.1f} min, of which training {sum(times) / 60:.1f} min "
                 f"({len(times)} concepts, {min(times) / 60:.1f}-{max(times) / 60:.1f} min each)." if times else
                 f"Wall time: {front['seconds'] / 60:.1f} min (concepts from the cache).")
    return "\n".join(lines) + "\n"


TRAIN_SENTENCE_KEYS = ("steps", "batch_size", "gradient_accumulation")  # front_section states these of every recipe


def _recipe_text(train: dict) -> str:
    """A training recipe in words: "steps 500, batch 2, 1 micro-batch per step, value_lr 0.1"."""
    rest = _changes_text({k: v for k, v in train.items()
                          if k not in TRAIN_SENTENCE_KEYS + ("seed", "resolution")})
    return (f"steps {train['steps']}, batch {train['batch_size']}, {train['gradient_accumulation']} "
            "micro-batch per step" + (f", {rest}" if rest else ""))


def _changes_text(changes: dict) -> str:
    """A recipe's changes to the training inputs: "value_lr 0.1, masks"."""
    return ", ".join(k if v is True else f"{k} {v:g}" for k, v in changes.items())


def _front_recipe_changes(front: dict) -> dict:
    """The changes to front.json's "train" of the recipe the front was sampled with (none before it is)."""
    return next((row["changes"] for row in front["learnability"] if row["recipe"] == front.get("recipe")), {})


def _learnability_lines(front: dict, base_names: dict) -> list[str]:
    """Can the base render the concept? The recipes tried before the front (front.learnability), on this base and
    on the bases tried before it (front.earlier_bases). base_names: cache folder -> run.py --base option."""
    import front as front_module
    train = front["train"]
    lines = ["### Can this base model render the concept?", "",
             f"Perfusion, training seed 0, with the front's recipe ({train['steps']} steps, batch "
             f"{train['batch_size']}, {train['gradient_accumulation']} micro-batch per step) and with changes to it; "
             f"applied at beta 0.4 (tau {front_module.TAU:g}), where fidelity is highest, in the unseen contexts. The "
             f"front is sampled with the first recipe whose fidelity reaches {front_module.MIN_FIDELITY:g}.", "",
             "| base (`--base`) | recipe | training time | fidelity | detected | alignment (background and position) "
             "| images |", "|---|---|---|---|---|---|---|"]
    tried = front.get("earlier_bases", []) + [{"base": front["base"], "learnability": front["learnability"]}]
    for base in tried:
        for row in base["learnability"]:
            name = row["recipe"] or "the front's recipe"
            changes = _changes_text(row["changes"])
            seconds = f"{row['training_seconds'] / 60:.1f} min" if row["training_seconds"] else "see §6"
            lines.append(f"| `{base['base']}` ({base_names.get(base['base'], '?')}) | "
                         f"{name}{f' ({changes})' if changes and row['recipe'] else ''} | {seconds} | "
                         f"{row['fidelity']:.3f} | {row['detected']:.0%} | {row['alignment']:.0%} | {row['images']} |")
    if front.get("recipe") is None:
        lines += ["", f"No recipe reaches fidelity {front_module.MIN_FIDELITY:g} on this base model, so the front "
                  "was not sampled: with fidelity near 0 at every setting there is nothing to trade against "
                  "alignment, and every method would look perfectly aligned."]
    else:
        lines += ["", f"The front below uses: {front['recipe'] or 'the front recipe'}."]
    return lines + [""]


def _diagnosis_lines(diagnosis: dict, command: str) -> list[str]:
    """diagnose.py: today's judge on the 2026-11-28 images, and the 2026-11-28 pack on today's base."""
    import diagnose
    old = diagnosis["old_pack"]
    lines = ["### Why: the judges, the pack or the base?", "",
             f"`{command} --until diagnose` (diagnose.py). The concepts of 2026-11-28 were recognised (tw_circle: "
             "fidelity 0.93 at beta 0.4, §4); those trained since, with the 1-thread base rebuilt from the same "
             "config, are not. Between the runs the judges were retrained, the pack changed and the base was rebuilt. "
             f"Today's concept judge on the images of that run's figure (`figures/contexts_tw_circle.png` as of commit "
             f"{diagnose.RUN_2026_11_28}, the first image of each of the 8 context prompts):", "",
             "| setting (2026-11-28) | fidelity recorded then (its judge, 24 images) | today's judge on the figure "
             "(8 images) | detected today |", "|---|---|---|---|"]
    for row in diagnosis["rejudge"]:
        lines.append(f"| {row['setting']} | {row['recorded_fidelity']:.3f} | {row['today_fidelity']:.3f} | "
                     f"{row['today_detected']:.0%} |")
    recipe = ", ".join(f"{k} {v:g}" for k, v in old["recipe"].items() if k not in ("seed", "resolution"))
    lines += ["", f"The pack of 2026-11-28 (commit {old['pack']}, in a git worktree, with its own nodes and toy-world "
              f"harness) trained tw_circle on today's base `{diagnosis['base']}` with that run's recipe ({recipe}; "
              f"{old['training_seconds'] / 60:.1f} min, {old['torch_threads']} torch threads) and sampled the same 8 "
              "context prompts; today's judge: "
              + "; ".join(f"beta {beta}: fidelity {x['fidelity']:.3f}, detected {x['detected']:.0%} of {x['images']}"
                          for beta, x in old["by_beta"].items()) + ".", "",
              "Reading: " + _diagnosis_reading(diagnosis), ""]
    return lines


def _diagnosis_reading(diagnosis: dict) -> str:
    """What the two checks say, decided from their numbers (judges agree within 0.25 on every setting; the old pack
    reaches at most front.MIN_FIDELITY)."""
    import front as front_module
    judges_agree = all(abs(r["today_fidelity"] - r["recorded_fidelity"]) < 0.25 for r in diagnosis["rejudge"])
    old_fails = max(x["fidelity"] for x in diagnosis["old_pack"]["by_beta"].values()) < front_module.MIN_FIDELITY
    if not (judges_agree and old_fails):
        return (f"the judges {'agree' if judges_agree else 'disagree'} and the old pack "
                f"{'fails' if old_fails else 'succeeds'} on today's base; the cause is not isolated by these checks.")
    return ("today's judge reads the 2026-11-28 images as that run's judge did (within 0.25 on every setting), so the "
            "judges did not change the verdict; the 2026-11-28 pack fails on today's base as today's pack does, so "
            "the pack did not either. What changed is the base model, rebuilt from the same config with another "
            "torch thread count. Whether a base renders a held-out look after a short training is a property of "
            "the particular base, not of its config: a base must pass the check above before a fidelity claim rests "
            "on it, and the base config now records the thread count (run.py BASE_CONFIG).")


def _front_set_lines(front: dict, prompt_set: str) -> list[str]:
    import front as front_module
    analysis = front_module.analyse(front, prompt_set)
    base = front["superclass"][prompt_set]
    size = "size" in analysis["table"][0]
    lines = [f"### {SET_TITLES[prompt_set]}", "",
             f"Alignment here: {SET_ALIGNMENT[prompt_set]}. The base model with the plain word `circle` in the same "
             f"prompts ({base['images']} images): alignment {base['alignment']:.0%}"
             + (f", size as prompted {base['size']:.0%}" if size else "") + f", fidelity {base['fidelity']:.3f}.", "",
             "| setting | seeds | images | fidelity | detected |" + (" size small |" if size else "")
             + " alignment | joint |", "|---|---|---|---|---|" + ("---|" if size else "") + "---|---|"]
    for s in analysis["table"]:
        lines.append(f"| {s['label']} | {s['seeds']} | {s['images']} | {_interval(s['fidelity'], pct=False)} | "
                     f"{_interval(s['detected'])} | " + (f"{_interval(s['size'])} | " if size else "")
                     + f"{_interval(s['alignment'])} | {_interval(s['detected_and_aligned'])} |")
    lines += ["", f"![front, {prompt_set}](figures/front_{prompt_set}.png)", ""]
    k, kt = analysis["knob"], analysis["knob_trained_keys"]
    lines += ["Does beta trace a front? Between beta {:g} and {:g}, per seed:".format(*k["betas"]), "",
              "| method | fidelity falls by | detected falls by | alignment rises by | Fisher p, detected | "
              "Fisher p, alignment |", "|---|---|---|---|---|---|"]
    for name, x in (("locked keys", k), ("trained keys", kt)):
        lines.append(f"| {name} | {_signed(x['fidelity_fall'], pct=False)} | {_signed(x['detected_fall'])} | "
                     f"{_signed(x['alignment_rise'])} | {x['detected_fisher_p']:.2g} | {x['alignment_fisher_p']:.2g} |")
    vs_tk, vs_ti = analysis["vs_trained_keys"], analysis["vs_ti"]
    lines += ["", "Locked keys against trained keys and textual inversion at equal fidelity: per seed, the "
              "alignment of each method interpolated along its beta sweep at the fidelities both reach (for textual "
              "inversion, at its one point), locked minus the other, averaged over those fidelities; mean and "
              "interval over seeds:", ""]
    for name, vs in (("trained keys", vs_tk), ("textual inversion", vs_ti)):
        lines.append(f"- against {name}: {_difference(vs['alignment_difference'])}"
                     + (f"; seeds whose fidelities do not overlap: {vs['seeds_without_overlap']}"
                        if vs["seeds_without_overlap"] else ""))
    lines += ["", "Fisher's exact test, each baseline against the locked-keys setting nearest to it in mean "
              "fidelity (images pooled over seeds):", ""]
    for near in (analysis["nearest_trained_keys"], analysis["nearest_ti"]):
        lines.append(f"- {near['other']} against {near['locked']}: alignment p = {near['alignment_p']:.2g}, "
                     f"joint p = {near['detected_and_aligned_p']:.2g}")
    best = [(method, next(s for s in analysis["table"] if s["label"] == label))
            for method, label in analysis["best_joint"].items()]
    lines += ["", "Best joint success (concept detected and the prompt followed) of each method: "
              + "; ".join(f"{method.replace('_', ' ')} {_interval(s['detected_and_aligned'])} ({s['label']})"
                          for method, s in best) + ".", ""]
    return lines


def _signed(x: dict, pct: bool = True) -> str:
    """A difference over seeds: mean [interval], not cut (in percentage points where pct)."""
    f = (lambda v: f"{100 * v:+.0f}") if pct else (lambda v: f"{v:+.2f}")
    return f"{f(x['mean'])} [{f(x['low'])}, {f(x['high'])}]" + (" points" if pct else "")


SHAPE_HEADING = "## 9. Which latent keeps shape (no base model)"


def shape_section(result: dict, command: str, machine: str, date: str) -> str:
    """Section 9 from shape.json (shape.py): shape accuracy through each candidate latent."""
    import shape
    cfg, rows = result["config"], result["rows"]
    candidates = list(dict.fromkeys(r["candidate"] for r in rows))
    lines = [SHAPE_HEADING, "",
             f"`{command}`, {date}; {machine}.", "",
             "The mosaic VAE keeps 8x8 patch colour means, so shape survives only in how objects cover the patches "
             "(§3: the shape judge reads 58% of mosaics correctly). shape.py trains the judges' network as a shape "
             f"classifier (4 shapes, chance 25%) on {cfg['train_scenes']} single-object scenes of the judges' data "
             "(world objects, random looks, the concepts and their looks on other shapes) seen through each "
             f"candidate latent, nearest-upsampled back to 48x48, {cfg['epochs']} epochs, training seeds "
             f"{', '.join(map(str, cfg['train_seeds']))}; tested on {cfg['test_scenes']} held-out scenes. The rows "
             "marked ceiling learn their encoder (linear, 8x8 stride 8) jointly with the classifier: an estimate of "
             "what an encoder of that size can keep, limited by the short training; whether a decoder renders it is "
             "another question (the VAE table below).", "",
             "| latent | what | shape accuracy per seed [95% Wilson interval] | small | big | star | circle | "
             "star read as circle | circle read as star |", "|---|---|---|---|---|---|---|---|---|"]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    by_name = {name: [r for r in rows if r["candidate"] == name] for name in candidates}
    for rs in by_name.values():
        per_seed = ", ".join("{:.1%} [{:.1%}, {:.1%}]".format(r["accuracy"], *shape.wilson(r["correct"], r["n"]))
                             for r in rs)
        lines.append(f"| {rs[0]['latent']} | {rs[0]['description']} | {per_seed} | {_pct(mean(rs, 'accuracy_small'))} | "
                     f"{_pct(mean(rs, 'accuracy_big'))} | {_pct(mean(rs, 'accuracy_star'))} | "
                     f"{_pct(mean(rs, 'accuracy_circle'))} | {_pct(mean(rs, 'star_read_as_circle'))} | "
                     f"{_pct(mean(rs, 'circle_read_as_star'))} |")
    today = mean(by_name["means8"], "accuracy")
    gains = ", ".join(f"{rs[0]['description']} {100 * (mean(rs, 'accuracy') - today):+.1f}"
                      for name, rs in by_name.items() if name != "means8")
    lines += ["", f"Mean over seeds against today's latent ({today:.1%}), in points: {gains}.", ""]
    if result.get("vaes"):
        lines += _shape_vae_lines(result["vaes"])
        lines += ["One big object of each shape and the two concepts, as rendered and as each VAE decodes them "
                  "(run.shape_figure):", "", "![decodes](figures/shape_decodes.png)", ""]
    lines += ["Wall time: {:.1f} min for the first five candidates; per training: {}.".format(result["seconds"] / 60, ", ".join(
                  f"{name} {mean(rs, 'train_seconds') / 60:.1f} min per training" for name, rs in by_name.items())), ""]
    return "\n".join(lines)


def _shape_vae_lines(vaes: dict) -> list[str]:
    """The judges of §3 retrained through each VAE (judges.stage_judges) and read on its decodes of held-out scenes."""
    heads = ("shape", "size", "position", "background", "colour")
    concepts = sorted(next(iter(vaes.values()))["concept_accuracy_vae"])
    lines = ["What each VAE keeps, read by the judges of §3 retrained through it (judges.stage_judges, as `--only judges "
             "--vae <name>` runs it) on its decodes of held-out scenes (chance for shape: 25%). A patch-code VAE's filters "
             "start as the colour means and one random filter; how far each moved in training is |final - start| / "
             "|start| (patch_vae.filter_movement), and its learning rate is in units of a mean filter's entry:", "",
             "| VAE | filter learning rate | filters 0-3 moved | reconstruction L1 (256 scenes) | " + " | ".join(heads)
             + " | " + " | ".join(f"concept judge: {c}" for c in concepts) + " | VAE training | judges |",
             "|---|---|---|---|" + "---|" * (len(heads) + len(concepts) + 2)]
    for name, v in vaes.items():
        attribute, concept = v["attribute_accuracy_vae"], v["concept_accuracy_vae"]
        config = v["config"]
        filter_lr = config.get("filter_lr", config.get("lr")) if config["kind"] == "patch-code" else None
        moved = " / ".join(f"{m:.1%}" for m in v["filter_movement"]) if v.get("filter_movement") else "-"
        lines.append(f"| {name} | {filter_lr if filter_lr else '-'} | {moved} | {v['recon_l1_256']:.4f} | "
                     + " | ".join(f"{attribute[h]:.1%}" for h in heads) + " | "
                     + " | ".join(f"{concept[c]:.1%}" for c in concepts)
                     + f" | {v['seconds'] / 60:.1f} min | {v['judge_seconds'] / 60:.1f} min |")
    return lines + [""]

