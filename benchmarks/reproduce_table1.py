#!/usr/bin/env python
r"""Reproduce the MNIST half of the paper's Table 1 at CPU scale: one resumable study.

Trains WGAN, Q-WGAN, Q-WGAN λ=0, DMWGAN-style (``benchmarks/table1/train_gan.py``) and β-VAE, Q-β-VAE,
Q-β-VAE λ=0 (``examples/mnist_qbvae.py``) on MNIST for several seeds — each run is a subprocess
of its training script — then evaluates
every run from its checkpoint and appends one JSON line per (model, seed) to
``OUT/results.jsonl``:

* **MNIST-FID** (:class:`qmm_plugin.paper.metrics.MNISTFID`, computed by the example at the end of
  training): generated images by ancestral sampling (z ~ N(0, I), manifold/generator i ~ uniform)
  against the whole test split (10,000 digits with the full MNIST).
* **Disentanglement** (Appendix D; :func:`qmm_plugin.paper.metrics.disentanglement_score`) for the
  slant and width transforms of the first ``dis_images`` test digits at ``dis_strengths``
  strengths. Encoder: the encoder mean for the VAEs; for every GAN a latent-only fit on its
  trained manifolds (``table1.evaluating.LatentEncoder``, which says why not ``q.invert(x).z``).

Per-run tangential spread (Theorem 1's right side) is logged by the examples over training;
``--report`` plots it (log scale, Q vs λ = 0, like the paper's Fig. H.4), draws the Fig. 5/6
generalisation grids from the trained Q-WGAN (seed 0), and rewrites the generated blocks of
``docs/RESULTS.md`` from the results file (every number in those blocks comes from it).

Budget (equal data per model inside each family: the same steps × batch; wall times are measured
and reported; a Q-β-VAE step costs about A times a β-VAE step, so equal data is not equal time):

=========  ===============================================  =====================================
preset     GANs (one critic + one generator update / step)  VAEs (10 EM iterations per step)
=========  ===============================================  =====================================
quick      2 seeds, 100 steps × 32, FID on 2,000 samples     2 seeds, 5 steps × 32 
full       3 seeds, 1,000 steps × 64, FID on 10,000          3 seeds, 30 steps × 64
recipe     3 seeds, 2,400 steps × 32, FID on 10,000;          —
           the main example's recipe (below)
smoke      the examples' ``--smoke`` (tests; seconds)
=========  ===============================================  =====================================

``--recipe`` trains the four GANs under the main example's recipe instead of Appendix B's
settings (``table1.config.RECIPE_GANS``: Q-WGAN, Q-WGAN λ = 0 and WGAN are
``examples/mnist_qwgan.py`` with ``--lam 0`` / ``--num-biases 1 --info 0``, the DMWGAN-style bank
gets the recipe's Adam β1); the evaluation scores the moving average of G the recipe samples from.
``--gan-recipe ours`` applies the recipe to any preset (``--smoke --gan-recipe ours`` in tests).

Each results row records its run's ``sec_per_step`` and ``example_wall_s``; two runs go at a
time by default (``--jobs 2``, one thread each).

Disentanglement sizes: quick 6 digits × 7 strengths, 50 fit steps; full 10 digits × 11
strengths, 100 fit steps (the paper: 500 × 11). ``--gan-steps/--vae-steps/--seeds`` override.

Resumable: a stopped study (Ctrl-C, killed session) continues where it stopped when rerun with
the same command — finished (model, seed) pairs are skipped (found in ``results.jsonl``), an
unfinished run continues from its checkpoint (``--resume`` of the example), a run whose training
finished is only evaluated.

The code is the package ``benchmarks/table1/``: ``running`` (training and evaluation
subprocesses, the resumable study loop), ``evaluating`` (scores of one trained run), ``reporting``
(tables, plots, grids), ``config`` (models, presets, the paper's numbers); this file is its
command line.

Usage::

    python benchmarks/reproduce_table1.py --quick
    python benchmarks/reproduce_table1.py                         # full (hours), resumable
    python benchmarks/reproduce_table1.py --quick --report        # (re)write docs/RESULTS.md blocks
    python benchmarks/reproduce_table1.py --recipe --report       # the GANs under the main job's recipe
    python benchmarks/reproduce_table1.py --smoke --data-dir embedded --out /tmp/s   # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from table1.config import DEFAULT_DATA, DOCS, GAN_MODELS, MODELS, PRESETS, REPO  # benchmarks/table1 (the script's folder)
from table1.evaluating import evaluate_run_main
from table1.reporting import report
from table1.running import run_study


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick preset")
    g.add_argument("--smoke", action="store_true", help="a few steps per run (tests; seconds per run)")
    g.add_argument("--recipe", action="store_true",
                   help="the recipe preset: the four GANs under the main example's recipe (RECIPE_GANS)")
    p.add_argument("--gan-recipe", choices=("paper", "ours"), default=None,
                   help="train the GANs with Appendix B's settings or the main example's recipe (default: the "
                        "preset's; only --recipe uses ours)")
    p.add_argument("--models", default=None,
                   help=f"comma-separated subset of {','.join(MODELS)} (default: all; with the recipe, the GANs)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: the preset's)")
    p.add_argument("--gan-steps", type=int, default=None, help="override the preset's GAN steps")
    p.add_argument("--vae-steps", type=int, default=None, help="override the preset's VAE steps")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help=f"folder with the four MNIST idx files (default: {DEFAULT_DATA}); 'embedded' = the "
                        "10k/2k subset inside qmm_plugin (for tests)")
    p.add_argument("--out", default=None,
                   help="study folder (default: runs/table1/<preset>, or <preset>-<gan recipe> with --gan-recipe)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained/evaluated at the same time (default: 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each run's subprocesses (default: 1; see child_env)")
    p.add_argument("--evaluate-run", default=None, help=argparse.SUPPRESS)  # internal: one run's evaluation
    p.add_argument("--payload", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true",
                   help="after the study (or instead, with --report-only): plots, grids and the generated "
                        "block of --doc")
    p.add_argument("--report-only", action="store_true", help="only write the report from existing results")
    p.add_argument("--no-grids", action="store_true", help="report without the generalisation grids")
    p.add_argument("--doc", default=str(DOCS / "RESULTS.md"), help="markdown file whose block is rewritten")
    p.add_argument("--assets", default=str(DOCS / "results"), help="folder for plots and results copies")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    preset = "quick" if args.quick else "smoke" if args.smoke else "recipe" if args.recipe else "full"
    b = PRESETS[preset]
    if args.gan_recipe is not None:
        b = replace(b, recipe=args.gan_recipe)
    for name in ("seeds", "gan_steps", "vae_steps"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            b = replace(b, **{name: value})
    args.budget = b
    if args.models is None:
        args.models = ",".join(GAN_MODELS if b.recipe == "ours" else MODELS)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_list if m not in MODELS]
    if unknown or not args.model_list:
        p.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
    if b.recipe == "ours" and (vaes := [m for m in args.model_list if m not in GAN_MODELS]):
        p.error(f"--models {','.join(vaes)}: the recipe is the GANs' (examples/mnist_qwgan.py); train the VAEs "
                "without --recipe / --gan-recipe ours, or leave them out of --models")
    if args.data_dir == "embedded":
        args.data_dir = None
    elif not Path(args.data_dir).is_dir() and args.evaluate_run is None:  # an evaluation's payload names its data
        p.error(f"--data-dir {args.data_dir} does not exist; pass the folder with the MNIST idx files, or "
                "--data-dir embedded for the small subset inside qmm_plugin")
    default_out = preset if b.recipe == PRESETS[preset].recipe else f"{preset}-{b.recipe}"
    args.out = Path(args.out) if args.out else REPO / "runs" / "table1" / default_out
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.evaluate_run is not None:
        return evaluate_run_main(Path(args.evaluate_run), args.payload)
    b = args.budget
    print(f"study {b.preset}: {b.seeds} seed(s) × {len(args.model_list)} models; GAN {b.gan_steps} steps, VAE "
          f"{b.vae_steps} steps, batch {b.batch_size}; out {args.out}; {args.jobs} job(s) × {args.threads} thread(s); "
          f"no GPU used (--device cpu)", flush=True)
    code = 0
    if not args.report_only:
        try:
            code = run_study(b, args.model_list, args.out, args.data_dir, args.jobs, args.threads)
        except KeyboardInterrupt:
            print("\nstopped; rerun the same command to continue where it stopped", file=sys.stderr)
            return 130
    if args.report or args.report_only:
        study = args.out / "study.json"
        cmd = json.loads(study.read_text())["command"].strip() if study.is_file() else "?"
        doc = report(b, args.model_list, args.out, args.data_dir, Path(args.doc), Path(args.assets), cmd,
                     grids=not args.no_grids)
        print(f"report: {doc}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
