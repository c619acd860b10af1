"""Reporting: the tables, spread curves and grids of ``docs/RESULTS.md``, every number from the
study's results file."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qmm_plugin.io import atomic_write_text

from .config import MANIFOLD_CLASS_KEYS, MODELS, PAPER_TABLE1, RECIPE_GANS, REPO, Budget
from .evaluating import generalisation_grids, manifold_structure
from .running import read_results


_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def plot_log_curves(series: list[tuple[str, list[float], list[float], tuple[int, int, int], bool]], path: Path,
                    title: str, xlabel: str, ylabel: str, size: tuple[int, int] = (760, 460)) -> Path:
    """A line plot with a log10 y axis, drawn with Pillow (no plotting library needed).

    ``series``: ``(label, xs, ys, rgb, dashed)``; non-positive ys are dropped (log scale).
    """
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 80, 200, 36, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    pts = [(x, y) for _, xs, ys, _, _ in series for x, y in zip(xs, ys) if y > 0 and math.isfinite(y)]
    if not pts:
        raise ValueError(f"plot_log_curves: nothing positive to plot for {path.name}")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    lo = math.floor(math.log10(min(p[1] for p in pts)))
    hi = math.ceil(math.log10(max(p[1] for p in pts)))
    hi = max(hi, lo + 1)
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (hi - math.log10(y)) / (hi - lo) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for e in range(lo, hi + 1):
        _, yy = px(x0, 10.0 ** e)
        draw.line([left, yy, w - right, yy], fill=(225, 225, 225))
        draw.text((left - 8, yy), f"1e{e}", fill="black", font=font, anchor="rm")
    for i in range(6):
        x = x0 + (x1 - x0) * i / 5
        xx, _ = px(x, 10.0 ** hi)
        draw.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        draw.text((xx, h - bottom + 6), f"{x:g}", fill="black", font=font, anchor="mt")
    draw.text((left, 2), title, fill="black", font=font)
    draw.text((left + (w - left - right) / 2, h - 18), xlabel, fill="black", font=font, anchor="mt")
    draw.text((8, top - 16), ylabel, fill="black", font=font)
    for k, (label, xs, ys, rgb, dashed) in enumerate(series):
        line = [px(x, y) for x, y in zip(xs, ys) if y > 0 and math.isfinite(y)]
        for p, q in zip(line, line[1:]):
            if not dashed:
                draw.line([p, q], fill=rgb, width=2)
                continue
            length = math.hypot(q[0] - p[0], q[1] - p[1])
            for t0 in range(0, max(int(length), 1), 12):  # 7 px dash, 5 px gap
                a, c = t0 / max(length, 1e-9), min(t0 + 7, length) / max(length, 1e-9)
                draw.line([(p[0] + a * (q[0] - p[0]), p[1] + a * (q[1] - p[1])),
                           (p[0] + c * (q[0] - p[0]), p[1] + c * (q[1] - p[1]))], fill=rgb, width=2)
        for p in line:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=rgb)
        ly = top + 8 + 18 * k
        lx = w - right + 10
        draw.line([lx, ly, lx + 24, ly], fill=rgb, width=2)
        if dashed:
            draw.line([lx + 7, ly, lx + 12, ly], fill="white", width=2)
            draw.line([lx + 19, ly, lx + 24, ly], fill="white", width=2)
        draw.text((lx + 30, ly), label, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def spread_curves(out: Path, models: Sequence[str], runs: set[tuple[str, int]]
                  ) -> dict[str, dict[str, list[list[float]]]]:
    """``{model: {layer: [[step, geometric mean over seeds of tr cov(a_par)], ...]}}`` from the
    ``metrics.json`` of the finished ``runs`` ((model, seed) pairs in the results file; a run still
    training is left out) — the tangential spread logged at every sample grid."""
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for model in models:
        per_layer: dict[str, dict[int, list[float]]] = {}
        for seed in sorted(s for m, s in runs if m == model):
            path = out / f"{model}_s{seed}" / "metrics.json"
            if not path.is_file():
                continue
            for row in json.loads(path.read_text())["rows"]:
                for key, v in row.items():
                    if key.startswith("tangential_spread/") and isinstance(v, (int, float)) and v > 0:
                        per_layer.setdefault(key.split("/", 1)[1], {}).setdefault(int(row["step"]), []).append(v)
        if per_layer:
            curves[model] = {layer: [[s, math.exp(statistics.fmean(math.log(v) for v in vs))]
                                     for s, vs in sorted(pts.items())] for layer, pts in per_layer.items()}
    return curves


def _stats(values: list[float]) -> tuple[float, float | None, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def _fmt(values: list[float], digits: int = 2) -> str:
    mean, std, n = _stats(values)
    if n == 0:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def summarize(rows: list[dict[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    """One summary row per model: mean/std/n of every metric (the numbers the tables print)."""
    table = []
    for m in models:
        rs = [r for r in rows if r["model"] == m]
        if not rs:
            continue
        entry: dict[str, Any] = {"model": m, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                                 "steps": sorted({r["steps"] for r in rs}), "batch_size": rs[0]["batch_size"]}
        for key in ("mnist_fid", "dis_slant", "dis_width", "sec_per_step", "example_wall_s", "dis_eval_s",
                    "fid_real_train_vs_test"):
            mean, std, n = _stats([r.get(key) for r in rs])
            entry[key] = {"mean": mean, "std": std, "n": n}
        for key in MANIFOLD_CLASS_KEYS:
            mean, std, n = _stats([(r.get("manifold_classes") or {}).get(key) for r in rs])
            entry[f"manifold_classes/{key}"] = {"mean": mean, "std": std, "n": n}
        table.append(entry)
    return table


def render_tables(rows: list[dict[str, Any]], b: Budget, models: Sequence[str], out: Path,
                  assets: dict[str, str], command: str,
                  structure: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """The generated markdown block: budget, Table 1 beside the paper, plots, commands."""
    n_seeds = sorted({r["seed"] for r in rows})
    per_model = {m: [r for r in rows if r["model"] == m] for m in models}
    complete = all(len(per_model[m]) == b.seeds for m in models)
    lines = [f"Preset **{b.preset}** — {len(rows)} of {b.seeds * len(models)} runs finished"
             + ("" if complete else " (**partial**: n = seeds finished per cell)") + f"; results file "
             f"`{assets['results']}`. Command: `{command}`.", ""]
    if b.recipe == "ours":
        lines += ["Training: the main example's recipe (`examples/mnist_qwgan.py`, preset `ours`: hinge loss, "
                  "Adam β1 = 0.5, G's learning rate 5 × the critic's, samples from a moving average of G, "
                  "stratified manifolds, the manifold-recovery term) for the one-generator models; the "
                  "DMWGAN-style bank with the study's trainer and the recipe's β1. Per model:", ""]
        lines += ["- {}: `{}`".format(MODELS[m][1], " ".join(["python", os.path.relpath(RECIPE_GANS[m][0], REPO),
                                                               *RECIPE_GANS[m][1]]))
                  for m in models if m in RECIPE_GANS]
        lines.append("")
    lines += ["| model | steps × batch | n | s/step (this machine) | example wall (train + FID) | "
              "disentanglement eval |", "|---|---|---|---|---|---|"]
    for m in models:
        rs = per_model[m]
        if not rs:
            lines.append(f"| {MODELS[m][1]} | {b.steps(m)} × {b.batch_size} | 0 | — | — | — |")
            continue
        lines.append(f"| {MODELS[m][1]} | {rs[0]['steps']} × {rs[0]['batch_size']} | {len(rs)} | "
                     f"{_fmt([r['sec_per_step'] for r in rs], 3)} | {_fmt([r['example_wall_s'] for r in rs], 0)} s | "
                     f"{_fmt([r['dis_eval_s'] for r in rs], 0)} s |")
    fid_imgs = sorted({r.get("fid_test_images") for r in rows} - {None})
    ref = [r["fid_real_train_vs_test"] for r in rows if r.get("fid_real_train_vs_test") is not None]
    total = sum(r["example_wall_s"] + r["dis_eval_s"] for r in rows) / 3600
    lines += ["", f"Sum over runs of (example wall + disentanglement evaluation): {total:.2f} h "
              "(runs overlap with `--jobs 2`, so the study's elapsed time is shorter).", ""]
    lines += [f"MNIST-FID: {b.fid_samples} generated images vs {', '.join(map(str, fid_imgs))} test digits"
              + (f" (for scale, {b.fid_samples} real training digits score {ref[0]:.2f})" if ref else "")
              + ". Disentanglement: "
              f"{b.dis_images} test digits × {b.dis_strengths} strengths; GAN encoder: latent-only fit on "
              f"the trained manifolds, {b.inversion_steps} Adam steps per stage. Seeds: {', '.join(map(str, n_seeds))}.", "",
              "| model | MNIST-FID (ours) | FID (paper) | Dis. slant (ours) | (paper) | Dis. width (ours) | (paper) |",
              "|---|---|---|---|---|---|---|"]
    for m in models:
        rs = per_model[m]
        p = PAPER_TABLE1[m]
        pf = {k: f"{v[0]:.2f} ± {v[1]:.2f}" for k, v in p.items()}
        n = f" (n={len(rs)})" if rs and len(rs) != b.seeds else ""
        lines.append(f"| {MODELS[m][1]}{n} | {_fmt([r['mnist_fid'] for r in rs])} | {pf['fid']} | "
                     f"{_fmt([r['dis_slant'] for r in rs])} | {pf['slant']} | "
                     f"{_fmt([r['dis_width'] for r in rs])} | {pf['width']} |")
    lines.append("")
    if any(r.get("manifold_classes") for r in rows):
        lines += ["Manifold-class report at the end of training (bundled MNIST classifier on the run's own "
                  "report samples; `qmm_plugin.paper.manifold_classes`): NMI(manifold; class), purity, distinct "
                  "majority classes among the manifolds, share classified with p > 0.9, smallest class's share "
                  "of all samples, within-manifold diversity (— : the row has no report).", "",
                  "| model | NMI | purity | distinct majorities | confident | smallest class | diversity |",
                  "|---|---|---|---|---|---|---|"]
        for m in models:
            reps = [r.get("manifold_classes") or {} for r in per_model[m]]
            lines.append(f"| {MODELS[m][1]} | " + " | ".join(
                _fmt([x.get(k) for x in reps], 1 if k == "distinct_majorities" else 3)
                for k in MANIFOLD_CLASS_KEYS) + " |")
        lines.append("")
    structure = structure or {}

    def gmean(values: list[float]) -> float:
        return math.exp(statistics.fmean(math.log(max(v, 1e-300)) for v in values))

    if any(r.get("tangential_spread") for r in rows) or structure:
        lines += ["Bias banks and manifolds at the end of training (geometric mean over seeds for the spreads, "
                  "mean ± std for the diversity). Tangential spread tr cov(a_par) is what R_BA drives down; the "
                  "total spread tr cov(a) includes the normal parts that make the manifolds differ; diversity = "
                  "pixel distance between two manifolds' images of the same z over the distance between two "
                  "codes on one manifold (0: all manifolds draw the same image).", "",
                  "| model | tangential spread per layer | total bias spread per layer | manifold diversity |",
                  "|---|---|---|---|"]
        for m in models:
            st = structure.get(m, [])
            # the sampled generator's checkpoint where the report could load it, else the training log
            spreads = ([x["tangential_spread"] for x in st if "tangential_spread" in x]
                       or [r["tangential_spread"] for r in per_model[m] if r.get("tangential_spread")])
            if not spreads and not st:
                continue
            tang = ", ".join(f"{k}: {gmean([x[k] for x in spreads]):.3g}" for k in sorted(spreads[0])) if spreads else "—"
            banks = [x["bias_spread"] for x in st if "bias_spread" in x]
            total = ", ".join(f"{k}: {gmean([x[k] for x in banks]):.3g}" for k in sorted(banks[0])) if banks else "—"
            div = _fmt([x["diversity"] for x in st], 3) if st else "—"
            lines.append(f"| {MODELS[m][1]} | {tang} | {total} | {div} |")
        lines.append("")
    for key, alt in (("spread_gan", "tangential spread, Q-WGAN vs λ=0"),
                     ("spread_vae", "tangential spread, Q-β-VAE vs λ=0")):
        if key in assets:
            lines += [f"![{alt}]({assets[key]})", ""]
    gen_models = [m for m in ("qwgan", "qwgan-l0") if any(k.startswith("generalize_") and f"_{m}_" in k
                                                          for k in assets)]
    if gen_models:
        lines += ["Generalisation (Fig. 5/6; seed 0; rows: input | reconstruction | derived-manifold samples):", "",
                  "| input | " + " | ".join(MODELS[m][1] for m in gen_models) + " |",
                  "|---|" + "---|" * len(gen_models)]
        for kind in ("noise", "colour", "letters"):
            cells = [f"![{kind} {m}]({assets[k]})" if (k := f"generalize_{kind}_{m}_{b.preset}") in assets else "—"
                     for m in gen_models]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    sample_keys = [m for m in models if f"samples_{m}" in assets]
    if sample_keys:
        lines += ["Final sample grids, seed 0 (rows: manifolds / generators, columns: shared latents):", "",
                  "| " + " | ".join(MODELS[m][1] for m in sample_keys) + " |", "|" + "---|" * len(sample_keys),
                  "| " + " | ".join(f"![{m}]({assets[f'samples_{m}']})" for m in sample_keys) + " |", ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_block(doc: str, name: str, body: str) -> str:
    """Replace the text between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``
    (appended at the end when the markers are absent)."""
    begin, end = f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"
    block = f"{begin}\n<!-- written by benchmarks/reproduce_table1.py --report; edits here are overwritten -->\n" \
            f"{body}{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc)
    return doc.rstrip() + "\n\n" + block + "\n"


def report(b: Budget, models: Sequence[str], out: Path, data_dir: str | None, doc: Path, assets_dir: Path,
           command: str, grids: bool = True) -> Path:
    """Plots, generalisation grids, results copies and the generated block of ``doc``."""
    rows = [r for r in read_results(out / "results.jsonl") if r["model"] in models]
    if not rows:
        raise SystemExit(f"error: no results in {out / 'results.jsonl'}; run the study first (same --out/preset)")
    assets_dir.mkdir(parents=True, exist_ok=True)

    def rel(p: Path) -> str:
        return os.path.relpath(p, doc.parent)

    tag = b.preset
    shutil.copyfile(out / "results.jsonl", assets_dir / f"results_{tag}.jsonl")
    assets = {"results": rel(assets_dir / f"results_{tag}.jsonl")}
    summary = summarize(rows, models)
    atomic_write_text(json.dumps({"budget": asdict(b), "summary": summary, "paper": PAPER_TABLE1}, indent=1) + "\n",
                      assets_dir / f"summary_{tag}.json")
    curves = spread_curves(out, [m for m in models if m in ("qwgan", "qwgan-l0", "qbvae", "qbvae-l0")],
                           {(r["model"], r["seed"]) for r in rows})
    atomic_write_text(json.dumps(curves, indent=1) + "\n", assets_dir / f"spread_curves_{tag}.json")
    for key, pair, title in (("spread_gan", ("qwgan", "qwgan-l0"), "Q-WGAN (lambda=0.05, solid) vs lambda=0 (dashed)"),
                             ("spread_vae", ("qbvae", "qbvae-l0"), "Q-beta-VAE (lambda=1, solid) vs lambda=0 (dashed)")):
        series = []
        for j, m in enumerate(pair):
            for k, (layer, pts) in enumerate(sorted(curves.get(m, {}).items())):
                series.append((f"{m} {layer}", [p[0] for p in pts], [p[1] for p in pts],
                               _COLORS[k % len(_COLORS)], j == 1))
        if series:
            path = plot_log_curves(series, assets_dir / f"{key}_{tag}.png",
                                   f"tangential spread tr cov(a_par) over training ({title})", "training step",
                                   "tr cov(a_par)")
            assets[key] = rel(path)
    for m in ("qwgan", "qwgan-l0"):
        run_dir = out / f"{m}_s0"
        if grids and any(r["model"] == m and r["seed"] == 0 for r in rows):  # a finished run only
            for p in generalisation_grids(run_dir, m, assets_dir, data_dir, b.grid_inversion_steps, tag,
                                          images=2 if b.smoke else 6):
                assets[p.stem] = rel(p)
    for m in models:
        run_dir = out / f"{m}_s0"
        if not any(r["model"] == m and r["seed"] == 0 for r in rows):
            continue
        grids_png = sorted(run_dir.glob("samples_step*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
        if grids_png:
            dest = assets_dir / f"samples_{m}_{tag}.png"
            shutil.copyfile(grids_png[-1], dest)
            assets[f"samples_{m}"] = rel(dest)
    structure: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        st = manifold_structure(r["model"], out / f"{r['model']}_s{r['seed']}")
        if st is not None:
            structure.setdefault(r["model"], []).append(st)
    atomic_write_text(json.dumps(structure, indent=1) + "\n", assets_dir / f"manifold_structure_{tag}.json")
    text = doc.read_text() if doc.is_file() else "# Results\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(replace_block(text, tag, render_tables(rows, b, models, out, assets, command, structure)),
                      doc)
    return doc
