"""Train CycleGAN and StarGAN on the synthetic set and measure their translations.

Three parts, each model trained with the toolkit's one loop (``model.fit``) from the same seed,
on images rendered by :func:`anomalykit.data.synthetic.render_sample` (``--image-size`` px):

1. ``cyclegan_defect``: CycleGAN between good (A) and defective (B, every defect type of the
   category mixed) images of ``--category``; unpaired: the B images are other objects.
2. ``cyclegan_texture``: CycleGAN between two texture categories (``--textures``, A <-> B).
3. ``stargan``: StarGAN with the domains good (0) and each defect type of ``--category``
   (``DEFECTS[category]``, 1..K-1): one model that renders each defect type on a good image;
   the paper's WGAN-GP with 5 critic steps per generator step (the model's default).
4. ``stargan_lsgan``: the same with the least-squares loss and a generator step every step
   (no gradient penalty): what a CPU budget buys with the cheaper loss.

Images: ``--n-train`` training images per domain (good: the ``train`` split; defective: the
``test_defect`` split, indices disjoint from the held-out ones and, for StarGAN, per defect
type) and ``--n-held`` held-out images per domain (good: ``test_good``).

Measured on held-out images only: FD-Lite0 (Fréchet distance on pooled EfficientNet-Lite0
features at ``--embed-size`` px, see :mod:`anomalykit.metrics.sample_quality`; NOT an FID) and
k-NN precision / recall (k = 3) of

- the translations of held-out source images against held-out real images of the target,
- the untranslated source images against the same target images (the reference: a
  translation that helps lands below it),
- training images of the target against the same held-out target images (the floor at this
  sample count),

and, for CycleGAN, the held-out cycle error |G_BA(G_AB(a)) - a| (and B's), and for StarGAN
the domain classifier's accuracy on held-out real images, the share of translations it
classifies as their target, and the mean absolute change |G(x, k) - x| per target domain.

Training time. Every model gets a time budget (``--train-seconds``, StarGAN
``--stargan-seconds`` each): a throwaway copy trains ``--probe-steps`` steps to time one step and
the model then trains that many steps (``--steps`` fixes them for a reproducible rerun). On
this shared machine the steps therefore depend on the load; results.md reports those used.

Writes into ``--out``: ``results.md`` (command, date, machine, versions, tables, pictures),
``results.csv`` (one row per measured set) and PNG grids (2x nearest upscaled):
``cyclegan_defect.png`` / ``cyclegan_texture.png`` (8 held-out images per row; rows
A | G_AB(A) | G_BA(G_AB(A)) | B | G_BA(B) | G_AB(G_BA(B))) and ``stargan.png`` /
``stargan_lsgan.png`` (first row: a
real held-out example of each domain; then one held-out good image per row: the input, then
its translation to each domain).

Usage::

    python benchmarks/translation_suite.py --out benchmarks/results/translation --threads 1
    python benchmarks/translation_suite.py --out /tmp/translation_quick --quick
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gan_suite import versions  # benchmarks/ is on sys.path

from anomalykit.atomic import atomic_write_csv, atomic_write_text
from anomalykit.data.io import image_grid, write_png
from anomalykit.data.synthetic import DEFECTS, render_sample
from anomalykit.generative.cyclegan import CycleGAN
from anomalykit.generative.stargan import StarGAN
from anomalykit.metrics.sample_quality import backbone_embeddings, frechet_distance, knn_precision_recall

PARTS = ("cyclegan_defect", "cyclegan_texture", "stargan", "stargan_lsgan")
# StarGAN as in the paper (WGAN-GP, 5 critic steps per generator step) and a cheaper variant.
STARGAN_LOSSES = {"stargan": {}, "stargan_lsgan": {"loss": "lsgan", "n_critic": 1}}
FIELDS = ["part", "row", "model_steps", "train_s", "n", "fd_lite0", "precision", "recall", "value",
          "error"]
GRID_IMAGES = 8
# Index offsets that keep the rendered sets apart (the renderer's stream is keyed by index).
HELD_OUT_OFFSET, DOMAIN_OFFSET = 100_000, 10_000


# -- data ----------------------------------------------------------------------------------


def render(category: str, split: str, indices, size: int, defect: str | None = None) -> torch.Tensor:
    """(N, 3, size, size) float in [0, 1]: the images exactly as the synthetic dataset writes them."""
    images = [render_sample(category, split=split, index=int(i), image_size=size, defect=defect)[1]
              for i in indices]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def good(category: str, n: int, size: int, *, held_out: bool) -> torch.Tensor:
    return render(category, "test_good" if held_out else "train", range(n), size)


def defective(category: str, n: int, size: int, *, held_out: bool, defect: str | None = None,
              offset: int = 0) -> torch.Tensor:
    start = offset + (HELD_OUT_OFFSET if held_out else 0)
    return render(category, "test_defect", range(start, start + n), size, defect)


# -- training and measuring ----------------------------------------------------------------


def train(model, data: dict, budget_s: float, batch_size: int, args) -> tuple[dict, float]:
    """Fit ``args.steps`` steps, or as many as fit ``budget_s`` (steps timed on a copy)."""
    options = {"batch_size": batch_size, "device": "cpu", "progress": False, "seed": args.seed}
    steps = args.steps
    if steps is None:
        probe = copy.deepcopy(model)
        probe.fit(data, epochs=1, max_steps=1, **options)  # the first step's warm-up, not timed
        history = probe.fit(data, epochs=1, max_steps=args.probe_steps, **options)
        step_s = (history["seconds"] - history["setup_seconds"]) / max(1, history["steps"])
        steps = max(1, int(budget_s / step_s))
        del probe
    steps_per_epoch = math.ceil(len(data["image"]) / batch_size)
    start = time.perf_counter()
    history = model.fit(data, epochs=math.ceil(steps / steps_per_epoch), max_steps=steps, **options)
    return history, time.perf_counter() - start


def embed(images: torch.Tensor, args) -> np.ndarray:
    return backbone_embeddings(images.clamp(0, 1), image_size=args.embed_size)


def quality(real_features: np.ndarray, fake_features: np.ndarray) -> dict:
    precision, recall = knn_precision_recall(real_features, fake_features, k=3)
    return {"fd_lite0": frechet_distance(real_features, fake_features), "precision": precision,
            "recall": recall, "n": len(fake_features)}


def enlarge(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, scale_factor=2, mode="nearest")


def model_options(args) -> dict:
    """The options every model of the run shares."""
    return {"width": args.width, "blocks": args.blocks, "d_width": args.d_width,
            "d_layers": args.d_layers, **({"lr": args.lr} if args.lr else {})}


def run_cyclegan(part: str, domains: dict, args, out: Path) -> list[dict]:
    """domains: {"a": (train, held), "b": (train, held), "names": (A name, B name)}."""
    (a_train, a_held), (b_train, b_held) = domains["a"], domains["b"]
    name_a, name_b = domains["names"]
    torch.manual_seed(args.seed)
    model = CycleGAN(args.image_size, **model_options(args))
    history, seconds = train(model, {"image": a_train, "image_b": b_train}, args.train_seconds,
                             args.batch_size, args)
    info = {"part": part, "model_steps": history["steps"], "train_s": round(seconds, 1)}
    rows = []
    for direction, source, target, target_train, src_name, tgt_name in (
            ("a2b", a_held, b_held, b_train, name_a, name_b),
            ("b2a", b_held, a_held, a_train, name_b, name_a)):
        target_features = embed(target, args)
        translated = model.translate(source, direction)
        for row, images in ((f"{direction}: G({src_name}) vs {tgt_name}", translated),
                            (f"{direction}: {src_name} untranslated vs {tgt_name} (reference)", source),
                            (f"{direction}: {tgt_name} train vs {tgt_name} (floor)",
                             target_train[:len(target)])):
            rows.append({**info, "row": row, **quality(target_features, embed(images, args))})
    for name, images, direction in ((name_a, a_held, "a2b"), (name_b, b_held, "b2a")):
        back = model.translate(model.translate(images, direction), "b2a" if direction == "a2b" else "a2b")
        rows.append({**info, "row": f"cycle error |rec - x| on held-out {name}",
                     "value": float((back - images).abs().mean()), "n": len(images)})
    if part == "cyclegan_defect":  # the A -> B -> A error as an anomaly score of good images
        from sklearn.metrics import roc_auc_score

        scores = torch.cat([model.score(a_held), model.score(b_held)]).numpy()
        labels = np.r_[np.zeros(len(a_held)), np.ones(len(b_held))]
        rows.append({**info, "row": "AUROC of the cycle error, held-out good vs defective",
                     "value": float(roc_auc_score(labels, scores)), "n": len(labels)})
    a, b = a_held[:GRID_IMAGES], b_held[:GRID_IMAGES]
    fake_b, fake_a = model.translate(a, "a2b"), model.translate(b, "b2a")
    grid = [a, fake_b, model.translate(fake_b, "b2a"), b, fake_a, model.translate(fake_a, "a2b")]
    write_png(out / f"{part}.png", image_grid(enlarge(torch.cat(grid)), nrow=len(a)))
    return rows


def run_stargan(part: str, args, out: Path) -> list[dict]:
    category, size = args.category, args.image_size
    names = ("good", *DEFECTS[category])
    train_sets = [good(category, args.n_train, size, held_out=False)]
    held_sets = [good(category, args.n_held, size, held_out=True)]
    for k, defect in enumerate(names[1:], start=1):
        offset = k * DOMAIN_OFFSET  # other objects per defect type: no pairs across domains
        train_sets.append(defective(category, args.n_train, size, held_out=False, defect=defect,
                                    offset=offset))
        held_sets.append(defective(category, args.n_held, size, held_out=True, defect=defect,
                                   offset=offset))
    data = {"image": torch.cat(train_sets),
            "domain": torch.arange(len(names)).repeat_interleave(args.n_train)}
    torch.manual_seed(args.seed)
    model = StarGAN(size, num_domains=len(names), **model_options(args), **STARGAN_LOSSES[part])
    history, seconds = train(model, data, args.stargan_seconds, args.stargan_batch_size, args)
    info = {"part": part, "model_steps": history["steps"], "train_s": round(seconds, 1)}
    rows = []
    held_domains = torch.arange(len(names)).repeat_interleave(args.n_held)
    accuracy = (model.classify(torch.cat(held_sets)).argmax(1) == held_domains).float().mean()
    rows.append({**info, "row": "D_cls accuracy on held-out real images (all domains)",
                 "value": float(accuracy), "n": len(held_domains)})
    source = held_sets[0]
    source_features = embed(source, args)
    for k, name in enumerate(names):
        translated = model.translate(source, k)
        rows.append({**info, "row": f"mean |G(good, {name}) - good|",
                     "value": float((translated - source).abs().mean()), "n": len(source)})
        hit = (model.classify(translated).argmax(1) == k).float().mean()
        rows.append({**info, "row": f"share of G(good, {name}) classified as {name}",
                     "value": float(hit), "n": len(source)})
        if k == 0:
            continue
        target_features = embed(held_sets[k], args)
        rows.append({**info, "row": f"G(good, {name}) vs {name}",
                     **quality(target_features, embed(translated, args))})
        rows.append({**info, "row": f"good untranslated vs {name} (reference)",
                     **quality(target_features, source_features)})
        rows.append({**info, "row": f"{name} train vs {name} (floor)",
                     **quality(target_features, embed(train_sets[k][:args.n_held], args))})
    x = source[:GRID_IMAGES]
    header = torch.cat([torch.ones(1, *x.shape[1:]), torch.stack([s[0] for s in held_sets])])
    columns = torch.stack([x] + [model.translate(x, k) for k in range(len(names))], dim=1)
    grid = torch.cat([header, columns.flatten(0, 1)])
    write_png(out / f"{part}.png", image_grid(enlarge(grid), nrow=len(names) + 1))
    return rows


# -- output --------------------------------------------------------------------------------


def fmt(value, spec: str) -> str:
    return "-" if value is None or value == "" else format(value, spec)


def write_results(out: Path, args, command: str, rows: list[dict], seconds: float) -> None:
    atomic_write_csv(out / "results.csv", rows, FIELDS)
    defects = ", ".join(DEFECTS[args.category])
    lines = [
        "# Image-to-image translation: CycleGAN and StarGAN on the synthetic set",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs visible, {torch.get_num_threads()} "
        "torch thread(s); a 2-core machine shared with other jobs, so seconds are not idle figures  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Whole run: {seconds / 60:.1f} min. {args.image_size} px; {args.n_train} training and "
        f"{args.n_held} held-out images per domain; batch {args.batch_size} (CycleGAN), "
        f"{args.stargan_batch_size} (StarGAN), seed {args.seed}; "
        f"generators width {args.width}, {args.blocks} residual blocks; PatchGAN width {args.d_width}, "
        f"{args.d_layers} strided layers. Training: "
        + (f"{args.steps} steps (fixed)" if args.steps else
           f"time budgets {args.train_seconds:g} s per CycleGAN, {args.stargan_seconds:g} s for StarGAN")
        + ". Learning rate: " + (f"{args.lr:g} for every model" if args.lr else
                                 "the models' defaults (CycleGAN 2e-4, StarGAN 1e-4)") + ".",
        "",
        f"FD-Lite0 = Fréchet distance on pooled EfficientNet-Lite0 features (320-D) at {args.embed_size} px "
        "against held-out real images of the target domain; not an FID, lower is better, biased upwards "
        "at these sample counts (compare rows of one table only). Precision / recall: k-NN manifolds "
        "(k = 3). \"reference\" = the untranslated source images: a translation that moves images "
        "towards the target lands below it. \"floor\" = training images of the target.",
        "",
    ]
    titles = {"cyclegan_defect": f"CycleGAN, {args.category}: good (A) <-> defective (B; {defects})",
              "cyclegan_texture": f"CycleGAN, textures: {args.textures[0]} (A) <-> {args.textures[1]} (B)",
              "stargan": f"StarGAN, {args.category}: domains good, {defects}; WGAN-GP, 5 critic "
                         "steps per generator step (the paper's)",
              "stargan_lsgan": f"StarGAN, {args.category}: the same domains; least-squares loss, "
                               "a generator step every step"}
    for part in PARTS:
        part_rows = [r for r in rows if r["part"] == part]
        if not part_rows:
            continue
        lines += [f"## {titles[part]}", ""]
        first = part_rows[0]
        if "error" in first and first.get("error"):
            lines += [f"Failed: {first['error']}", ""]
            continue
        lines += [f"Trained {first['model_steps']} steps in {first['train_s']} s.", "",
                  "| set | n | FD-Lite0 | precision | recall |", "|---|---:|---:|---:|---:|"]
        for r in part_rows:
            if r.get("fd_lite0") is not None:
                lines.append(f"| {r['row']} | {r['n']} | {r['fd_lite0']:.2f} | {r['precision']:.3f} | "
                             f"{r['recall']:.3f} |")
        other = [r for r in part_rows if r.get("value") is not None]
        if other:
            lines += ["", "| measure | n | value |", "|---|---:|---:|"]
            lines += [f"| {r['row']} | {r['n']} | {r['value']:.3f} |" for r in other]
        lines += ["", f"Picture: `{part}.png`.", ""]
    atomic_write_text(out / "results.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/translation"))
    parser.add_argument("--parts", default=",".join(PARTS), help="subset of " + ",".join(PARTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--category", default="washer", help="category of the good <-> defective parts")
    parser.add_argument("--textures", default="grass,brick", help="the two texture categories, A,B")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=400, help="training images per domain")
    parser.add_argument("--n-held", type=int, default=150, help="held-out images per domain")
    parser.add_argument("--train-seconds", type=float, default=150.0, help="budget per CycleGAN")
    parser.add_argument("--stargan-seconds", type=float, default=150.0, help="budget per StarGAN")
    parser.add_argument("--steps", type=int, default=None, help="fixed steps per model (no budget)")
    parser.add_argument("--probe-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1, help="CycleGAN's batch (1, the paper's)")
    parser.add_argument("--stargan-batch-size", type=int, default=1,
                        help="StarGAN's batch (16 in the paper; 1 got further in a CPU budget)")
    parser.add_argument("--width", type=int, default=16, help="generators' first width")
    parser.add_argument("--blocks", type=int, default=3, help="generators' residual blocks")
    parser.add_argument("--d-width", type=int, default=32, help="PatchGAN's first width")
    parser.add_argument("--d-layers", type=int, default=2, help="PatchGAN's strided layers")
    parser.add_argument("--lr", type=float, default=None, help="every model's learning rate "
                        "(default: the models' own, the papers')")
    parser.add_argument("--embed-size", type=int, default=128, help="image side the backbone sees")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_held, args.steps, args.width, args.d_width = 16, 16, 2, 8, 8
    args.textures = args.textures.split(",")
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or len(args.textures) != 2:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}; --textures needs two")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict] = []
    size, n_train, n_held = args.image_size, args.n_train, args.n_held
    for part in parts:
        try:
            if part == "cyclegan_defect":
                c = args.category
                domains = {"a": (good(c, n_train, size, held_out=False),
                                 good(c, n_held, size, held_out=True)),
                           "b": (defective(c, n_train, size, held_out=False),
                                 defective(c, n_held, size, held_out=True)),
                           "names": ("good", "defective")}
                rows += run_cyclegan(part, domains, args, args.out)
            elif part == "cyclegan_texture":
                a, b = args.textures
                domains = {"a": (good(a, n_train, size, held_out=False),
                                 good(a, n_held, size, held_out=True)),
                           "b": (good(b, n_train, size, held_out=False),
                                 good(b, n_held, size, held_out=True)),
                           "names": (a, b)}
                rows += run_cyclegan(part, domains, args, args.out)
            else:
                rows += run_stargan(part, args, args.out)
        except Exception as exc:  # report and go on: one failure must not hide the other parts
            traceback.print_exc()
            rows.append({"part": part, "row": "failed", "error": f"{type(exc).__name__}: {exc}"})
        for r in rows:
            if r["part"] == part:
                print(part, {k: v for k, v in r.items() if k != "part"}, flush=True)
    command = "python benchmarks/translation_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, args, command, rows, time.perf_counter() - started)
    print(f"wrote {args.out / 'results.md'} in {(time.perf_counter() - started) / 60:.1f} min")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
