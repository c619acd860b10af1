"""Running the study: each (model, seed) trained by its example script in a subprocess, evaluated
in a subprocess of ``benchmarks/reproduce_table1.py``, one JSON line per run appended to
``results.jsonl``; resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qmm_plugin.io import atomic_write_text

from .config import GAN_MODELS, MANIFOLD_CLASS_KEYS, MODELS, PRIORITY, RECIPE_GANS, REPO, SCRIPT, Budget


def train_command(model: str, seed: int, b: Budget, run_dir: Path, data_dir: str | None, resume: bool) -> list[str]:
    """The training command line of one run: its script with Appendix B's settings (``--model``), or
    for ``b.recipe == "ours"`` the script and flags of :data:`RECIPE_GANS`."""
    if b.recipe == "ours":
        script, flags = RECIPE_GANS[model]
    else:
        script, flags = MODELS[model][0], ("--model", model)
    steps = b.steps(model)
    cmd = [sys.executable, str(script), *flags, "--seed", str(seed), "--out", str(run_dir),
           "--no-progress", "--device", "cpu"]
    if data_dir is not None:
        cmd += ["--data-dir", data_dir]
    if b.smoke:
        cmd += ["--smoke"]
    else:
        every = max(1, steps // b.curve_points)  # sample grid + tangential spread; checkpoint
        cmd += ["--steps", str(steps), "--batch-size", str(b.batch_size), "--fid-samples", str(b.fid_samples),
                "--sample-every", str(every), "--ckpt-every", str(every), "--log-every", str(max(1, steps // 100))]
    if resume:
        cmd += ["--resume"]
    return cmd


def _checkpoint_step(run_dir: Path) -> int | None:
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text())["final"] if path.is_file() else {}


def _expected_steps(model: str, b: Budget) -> int:
    if not b.smoke:
        return b.steps(model)
    return min(b.gan_steps, 4) if model in GAN_MODELS else min(b.vae_steps, 2)


def child_env(threads: int) -> dict[str, str]:
    """Environment of the example / evaluation subprocesses: ``threads`` intra-op threads each.
    (On a shared 2-core machine two threads per process collapse under contention: a Q-WGAN step
    measured 2.6 s with two threads against 0.78 s with one while other jobs ran.)"""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def _run_logged(cmd: list[str], log: Path, threads: int) -> tuple[int, float]:
    """Run ``cmd`` with its output appended to ``log``; returns ``(exit code, wall seconds)``.
    On Ctrl-C the child (same process group, so it got the SIGINT too) is waited for: the
    examples write a checkpoint before exiting."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(threads))
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            raise
    return code, time.perf_counter() - t0


def _tail(log: Path, n: int = 15) -> str:
    return "".join(log.read_text().splitlines(keepends=True)[-n:])


def train(model: str, seed: int, b: Budget, run_dir: Path, data_dir: str | None, threads: int = 1) -> float:
    """Train (or continue, or only FID-evaluate) one run through its example; returns the wall
    seconds this call spent (0 when the run was already complete)."""
    steps = _expected_steps(model, b)
    final = _final_metrics(run_dir)
    at = _checkpoint_step(run_dir)
    if at == steps and final.get("steps") == steps and "mnist_fid" in final \
            and (b.smoke or final.get("mnist_fid_samples") == b.fid_samples):
        return 0.0
    if at is not None and at > steps:
        raise SystemExit(f"error: {run_dir} holds a run trained for {at} steps, more than this study's {steps}; "
                         "use another --out for this budget")
    resume = at is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(model, seed, b, run_dir, data_dir, resume)
    log = run_dir / "train.log"
    code, seconds = _run_logged(cmd, log, threads)
    if code != 0:
        raise RuntimeError(f"{model} seed {seed} training failed (exit {code}); log {log}:\n{_tail(log)}")
    _add_wall(run_dir, seconds)
    return seconds


def _add_wall(run_dir: Path, seconds: float) -> None:
    """Accumulate the example's wall time over resumed segments (run_dir/study_wall.json)."""
    path = run_dir / "study_wall.json"
    total = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    atomic_write_text(json.dumps({"seconds": total + seconds}) + "\n", path)


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:  # a line cut by a kill: report, do not guess
                raise SystemExit(f"error: {path} line {i} is not valid JSON ({err}); delete that line and rerun "
                                 "(the run is re-evaluated from its checkpoint)") from err
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line (rewritten atomically, so a kill never leaves half a line)."""
    text = path.read_text() if path.is_file() else ""
    atomic_write_text(text + json.dumps(row, sort_keys=True) + "\n", path)


def _done(rows: list[dict[str, Any]], model: str, seed: int, b: Budget) -> bool:
    key = b.eval_key()
    return any(r["model"] == model and r["seed"] == seed and r["steps"] == _expected_steps(model, b)
               and r.get("recipe", "paper") == b.recipe and all(r.get(k) == v for k, v in key.items())
               for r in rows)


def run_one(model: str, seed: int, b: Budget, out: Path, data_dir: str | None, threads: int, tag: str
            ) -> dict[str, Any]:
    """Train (example subprocess) and evaluate (subprocess of this script: ``--evaluate-run``) one
    run; returns its results row. Raises RuntimeError (with the log's tail) when a step fails."""
    run_dir = out / f"{model}_s{seed}"
    print(f"{tag}: training {_expected_steps(model, b)} steps (log {run_dir / 'train.log'})", flush=True)
    sec = train(model, seed, b, run_dir, data_dir, threads)
    final = _final_metrics(run_dir)
    print(f"{tag}: trained ({sec:.0f} s this call); MNIST-FID {final['mnist_fid']:.2f}; disentanglement ...",
          flush=True)
    payload = json.dumps({"model": model, "seed": seed, "budget": asdict(b), "data_dir": data_dir})
    log = run_dir / "eval.log"
    code, eval_s = _run_logged([sys.executable, str(SCRIPT), "--evaluate-run", str(run_dir),
                                "--payload", payload], log, threads)
    if code != 0:
        raise RuntimeError(f"{model} seed {seed} evaluation failed (exit {code}); log {log}:\n{_tail(log)}")
    dis = json.loads((run_dir / "disentanglement.json").read_text())
    rows = json.loads((run_dir / "metrics.json").read_text())["rows"]
    wall = json.loads((run_dir / "study_wall.json").read_text())["seconds"]
    print(f"{tag}: dis slant {dis['dis_slant']:.2f}, width {dis['dis_width']:.2f} ({eval_s:.0f} s)", flush=True)
    return {"model": model, "seed": seed, "preset": b.preset, "recipe": b.recipe, "steps": _expected_steps(model, b),
            "batch_size": b.batch_size if not b.smoke else None, **b.eval_key(),
            "mnist_fid": final["mnist_fid"], "fid_test_images": final.get("mnist_fid_test_images"),
            "fid_real_train_vs_test": final.get("mnist_fid_real_train_vs_test"),
            "dis_slant": dis["dis_slant"], "dis_width": dis["dis_width"], "threads": threads,
            "sec_per_step": rows[-1].get("sec_per_step"), "example_wall_s": round(wall, 1),
            "dis_eval_s": round(eval_s, 1),
            "tangential_spread": {k.split("/", 1)[1]: v for k, v in final.items()
                                  if k.startswith("tangential_spread/")},
            "manifold_classes": {k: final["report"][k] for k in MANIFOLD_CLASS_KEYS} if "report" in final else None,
            "run_dir": str(run_dir), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_study(b: Budget, models: Sequence[str], out: Path, data_dir: str | None, jobs: int = 1,
              threads: int = 1) -> int:
    """Train and evaluate every (seed, model) not yet in ``out/results.jsonl``, ``jobs`` runs at a
    time; seed-major order (and :data:`PRIORITY` within a seed), so a stopped study has every
    model at its first seeds. Only this (main) thread appends to the results file."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    command = " ".join(["python benchmarks/reproduce_table1.py", *sys.argv[1:]])
    atomic_write_text(json.dumps({**asdict(b), "models": list(models), "data_dir": data_dir, "command": command},
                                 indent=1) + "\n", out / "study.json")
    order = [(seed, m) for seed in range(b.seeds) for m in sorted(models, key=PRIORITY.index)]
    todo = []
    for k, (seed, model) in enumerate(order, 1):
        tag = f"[{k}/{len(order)}] {model} seed {seed}"
        if _done(read_results(results), model, seed, b):
            print(f"{tag}: in {results.name}, skipped", flush=True)
        else:
            todo.append((tag, seed, model))
    failures: list[str] = []
    t_study = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=jobs)
    running: dict[Future[dict[str, Any]], str] = {}
    try:
        for tag, seed, model in todo:
            running[pool.submit(run_one, model, seed, b, out, data_dir, threads, tag)] = tag
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                tag = running.pop(fut)
                try:
                    append_result(results, fut.result())
                    print(f"{tag}: appended to {results}; study so far {(time.perf_counter() - t_study) / 60:.1f} "
                          "min", flush=True)
                except RuntimeError as err:
                    print(f"{tag}: FAILED: {err}", file=sys.stderr, flush=True)
                    failures.append(tag)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        print(f"{len(failures)} run(s) failed: {', '.join(failures)}; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0
