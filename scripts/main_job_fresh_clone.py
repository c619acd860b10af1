#!/usr/bin/env python
"""Run the README's first command (the main job) in a fresh clone and a fresh virtual environment,
timed, and keep what it produced: the numbers the README quotes come from here.

    python scripts/main_job_fresh_clone.py                       # clone HEAD of this checkout
    python scripts/main_job_fresh_clone.py --out docs/results/main_job

Steps: ``git clone`` of this repository at HEAD into a temporary folder; a new ``python -m venv``
(no system packages, so the install is part of the time); the README's first command line run
there by ``bash`` with that venv first on ``PATH``; then ``OUT/run.json`` (commit, command,
wall-clock seconds, CPU count, exit status), ``OUT/metrics.json`` (the run's own file) and
``OUT/samples.png`` (its last sample grid) are written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_main_command(readme: Path) -> str:
    """The first command line of the README's first ``bash`` block, without its comment."""
    block = re.search(r"```bash\n(.*?)```", readme.read_text(), re.S)
    if block is None:
        raise SystemExit(f"error: no ```bash block in {readme}")
    first = block.group(1).strip().splitlines()[0]
    return first.split("#", 1)[0].strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "main_job")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                      text=True, check=True).stdout.strip():
        print("note: the checkout has uncommitted changes; the clone runs the committed HEAD", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="qmm_fresh_"))
    clone = work / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    command = readme_main_command(clone / "README.md")
    venv = work / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    print(f"clone {clone} at {commit[:10]}; running: {command}", file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env)
    wall = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = clone / "runs" / "mnist_qwgan"
    grids = sorted(run_dir.glob("samples_step*.png"), key=lambda q: int(re.sub(r"\D", "", q.stem)))
    if grids:
        shutil.copy(grids[-1], args.out / "samples.png")
    if (run_dir / "metrics.json").exists():
        shutil.copy(run_dir / "metrics.json", args.out / "metrics.json")
    record = {"commit": commit, "command": command, "wall_s": round(wall, 1), "returncode": proc.returncode,
              "cpus": os.cpu_count(), "platform": platform.platform(), "includes": "venv creation and install"}
    (args.out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
