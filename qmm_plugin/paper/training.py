"""Plumbing shared by the examples (one place, so the example scripts show only the model code).

* :func:`add_common_args` — the flags every example takes (``--seed --device --data-dir --out
  --steps --batch-size --resume --smoke ...``);
* :func:`setup_distributed` — single process, or ``torchrun --nproc_per_node=N`` with
  DistributedDataParallel (gloo on CPU, nccl on GPU); only rank 0 writes files;
* :class:`ShardedBatches` — deterministic, rank-sharded minibatches: the batch of a step is a pure
  function of ``(seed, step, rank)``, so a resumed run sees exactly the batches it would have seen;
* :func:`rng_state` / :func:`set_rng_state` — torch (CPU, CUDA) and Python ``random`` states, per
  rank, for exact ``--resume``;
* :class:`MetricsLog` — rows of scalars written to ``metrics.csv`` and ``metrics.json``
  (atomically; the rows travel in the checkpoint, so a resumed run continues the same files);
* :class:`StopFlag` — Ctrl-C asks the training loop to stop at the next step boundary, where the
  example writes a checkpoint before exiting (a second Ctrl-C aborts at once);
* :func:`tune_cpu_allocator` — keep freed tensor memory in the process heap (glibc), so a CPU
  training loop does not page-fault its large activations in afresh every step;
* guards that keep a run from losing work or silently ignoring a flag: :func:`explicit_flags` and
  :func:`apply_smoke` (``--smoke`` never overrides a flag the user gave), :func:`check_resume_args`
  / :func:`resume_settings` (``--resume`` continues with the checkpoint's settings, applies the
  flags that can change and refuses the others), :func:`prepare_output_dir` (``--out`` problems
  before any training; stale temp files of killed writes removed), :func:`read_checkpoint` (a
  corrupt checkpoint is named, not unpickled into a traceback) and :func:`nonfinite_entries` /
  :func:`nonfinite_loss_message` (a NaN/inf loss stops the run before it overwrites the last good
  checkpoint).

The examples, the study (``benchmarks/reproduce_table1.py``) and the benchmarks import it as
``qmm_plugin.paper.training``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import io
import json
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qmm_plugin._checks import check_finite_state
from qmm_plugin.io import atomic_torch_save, atomic_write_text, remove_stale_temp_files

if TYPE_CHECKING:
    from qmm_plugin.paper.manifold_classes import ManifoldClassReport

__all__ = [
    "add_common_args",
    "Dist",
    "setup_distributed",
    "setup_runtime",
    "cleanup_distributed",
    "ShardedBatches",
    "rng_state",
    "set_rng_state",
    "gather_rng_states",
    "MetricsLog",
    "StopFlag",
    "CHECKPOINT_NAME",
    "load_checkpoint",
    "save_checkpoint",
    "unwrap",
    "progress",
    "every",
    "check_positive",
    "seed_all",
    "mnist_fid",
    "TrainRun",
    "FlatRun",
    "average_gradients",
    "tune_cpu_allocator",
    "explicit_flags",
    "apply_smoke",
    "RESUMABLE_FLAGS",
    "check_resume_args",
    "resume_settings",
    "prepare_output_dir",
    "read_checkpoint",
    "nonfinite_entries",
    "nonfinite_loss_message",
    "NONFINITE_EXIT",
    "INTERRUPTED_EXIT",
]

CHECKPOINT_NAME = "checkpoint.pt"
#: Exit status of a run stopped by a NaN/inf loss (0: finished, :data:`INTERRUPTED_EXIT`: stopped by Ctrl-C).
NONFINITE_EXIT = 3
#: Exit status of a run stopped by Ctrl-C after writing its checkpoint.
INTERRUPTED_EXIT = 130


# ------------------------------------------------------------------------------------ arguments
def add_common_args(parser: argparse.ArgumentParser, *, out: str, steps: int, batch_size: int,
                    sample_every: int, ckpt_every: int, fid_samples: int) -> None:
    """Add the flags shared by every example; the keyword arguments are that example's defaults."""
    g = parser.add_argument_group("common")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu; "
                        "under torchrun on GPUs: cuda:$LOCAL_RANK)")
    g.add_argument("--data-dir", default=None,
                   help="folder with the four MNIST idx files (plain or .gz); default: the 10k-image "
                        "MNIST subset embedded in qmm_plugin")
    g.add_argument("--out", default=out, help=f"output folder (default: {out})")
    g.add_argument("--steps", type=int, default=steps, help=f"total training steps (default: {steps})")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"minibatch size per process (default: {batch_size})")
    g.add_argument("--resume", action="store_true",
                   help=f"continue from OUT/{CHECKPOINT_NAME} exactly where it stopped")
    g.add_argument("--sample-every", type=int, default=sample_every,
                   help=f"write a sample grid every N steps (default: {sample_every})")
    g.add_argument("--ckpt-every", type=int, default=ckpt_every,
                   help=f"write OUT/{CHECKPOINT_NAME} every N steps (default: {ckpt_every})")
    g.add_argument("--log-every", type=int, default=10, help="log metrics every N steps (default: 10)")
    g.add_argument("--fid-samples", type=int, default=fid_samples,
                   help=f"generated images for the final MNIST-FID (default: {fid_samples}; 0 = skip)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-alloc-tuning", action="store_true",
                   help="leave glibc's malloc thresholds as they are (default on CPU: raise them, see "
                        "tune_cpu_allocator in qmm_plugin/paper/training.py)")
    g.add_argument("--smoke", action="store_true",
                   help="a few steps with a tiny batch and a small FID sample (for tests; seconds)")


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> frozenset[str]:
    """The destinations (``args`` attribute names) of the flags given on the command line ``argv``
    (``None``: ``sys.argv[1:]``), whatever their value, also when it equals the default.

    Parses ``argv`` once more into a namespace whose every attribute is pre-set to a marker:
    argparse fills in defaults only for attributes not set yet, so the attributes that lose the
    marker are exactly the flags given.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--steps", type=int, default=400)
        >>> _ = p.add_argument("--smoke", action="store_true")
        >>> sorted(explicit_flags(p, ["--steps", "400"]))
        ['steps']
    """
    unset = object()
    namespace = argparse.Namespace(**{k: unset for k in vars(parser.parse_args(argv))})  # every destination
    given = parser.parse_args(argv, namespace=namespace)
    return frozenset(k for k, v in vars(given).items() if v is not unset)


def apply_smoke(args: argparse.Namespace, explicit: frozenset[str] | set[str],
                values: Mapping[str, Any | Callable[[argparse.Namespace], Any]]) -> frozenset[str]:
    """``--smoke``: set each flag of ``values`` that the user did not give (``explicit``, from
    :func:`explicit_flags`); a flag the user gave keeps its value. A callable value gets ``args``
    after the plain values are set (e.g. ``{"sample_every": lambda a: a.steps}``). Returns the
    destinations it set.

    Example:
        >>> a = argparse.Namespace(steps=400, batch_size=8)
        >>> sorted(apply_smoke(a, {"batch_size"}, {"steps": 4, "batch_size": 20}))
        ['steps']
        >>> (a.steps, a.batch_size)
        (4, 8)
    """
    chosen = {k: v for k, v in values.items() if k not in explicit}
    for key, value in chosen.items():
        if not callable(value):
            setattr(args, key, value)
    for key, value in chosen.items():
        if callable(value):
            setattr(args, key, value(args))
    return frozenset(chosen)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


#: Flags that a ``--resume`` may change: they take effect from the resumed step on (``--lr`` is
#: applied to the restored optimisers by :class:`TrainRun`). Any other flag that differs from the
#: checkpoint is refused by :func:`check_resume_args`.
RESUMABLE_FLAGS = frozenset({
    "steps", "lr", "device", "out", "sample_every", "ckpt_every", "log_every", "fid_samples", "no_progress",
    "no_alloc_tuning", "grid_columns",
})
#: Flags about this invocation only, never compared with the checkpoint.
_INVOCATION_FLAGS = frozenset({"resume"})


def check_resume_args(saved_args: Mapping[str, Any], saved_step: int, args: argparse.Namespace,
                      given: frozenset[str] | set[str], changeable: frozenset[str] = RESUMABLE_FLAGS) -> list[str]:
    """Reconcile the flags of a ``--resume`` with those saved in the checkpoint (``saved_args``,
    written at step ``saved_step``); changes ``args`` in place.

    * a flag not ``given`` takes the checkpoint's value (the run continues as it was started);
    * a ``given`` flag that differs from the checkpoint is kept if it is in ``changeable`` (it
      applies from step ``saved_step + 1``; the returned notes say so), else ``SystemExit`` names
      it: it would silently not apply (optimiser settings restored from the checkpoint, data,
      model shape);
    * ``--steps`` below ``saved_step`` is refused (the run is already past it).

    Returns one note per changed flag.

    Example:
        >>> a = argparse.Namespace(steps=800, lr=1e-4, seed=0, resume=True)
        >>> check_resume_args({"steps": 400, "lr": 2e-4, "seed": 0, "resume": False}, 400, a, {"steps", "lr"})
        ['--steps 800 (the checkpoint has 400): applies from step 401', '--lr 0.0001 (the checkpoint has 0.0002): applies from step 401']
    """
    notes: list[str] = []
    for key, saved in saved_args.items():
        if key in _INVOCATION_FLAGS or not hasattr(args, key):
            continue
        now = getattr(args, key)
        if now == saved:
            continue
        if key not in given:
            setattr(args, key, saved)
        elif key in changeable:
            notes.append(f"{_flag(key)} {now} (the checkpoint has {saved}): applies from step {saved_step + 1}")
        else:
            raise SystemExit(
                f"error: {_flag(key)} {now!r} differs from the checkpoint's {saved!r}, and a resumed run cannot "
                f"change it (flags that can change: {', '.join(_flag(k) for k in sorted(changeable))}); "
                f"resume without {_flag(key)}, or start a new run in another --out")
    steps = getattr(args, "steps", None)
    if steps is not None and steps < saved_step:
        raise SystemExit(f"error: --steps {steps} is below the checkpoint's step {saved_step}; pass --steps "
                         f">= {saved_step} to continue it (--steps {saved_step} only re-evaluates it)")
    return notes


def resume_settings(args: argparse.Namespace, given: frozenset[str] | set[str],
                    changeable: frozenset[str] = RESUMABLE_FLAGS) -> list[str]:
    """For ``--resume``, before anything is built: read ``OUT/checkpoint.pt`` and
    :func:`check_resume_args` against the flags it was written with; prints the notes to stderr
    and returns them. Does nothing without ``--resume``."""
    if not args.resume:
        return []
    ckpt = read_checkpoint(Path(args.out) / CHECKPOINT_NAME)
    notes = check_resume_args(ckpt.get("args", {}), ckpt["step"], args, given, changeable)
    for note in notes:
        print(f"resume: {note}", file=sys.stderr)
    return notes


def prepare_output_dir(out: Path) -> list[Path]:
    """Check ``--out`` before any training and make it: ``SystemExit`` if it is a file, cannot be
    created or is not writable, or if ``OUT/checkpoint.pt`` is a folder. Removes the temporary
    files that killed atomic writes left there (:func:`qmm_plugin.io.remove_stale_temp_files`;
    call it on the one process that writes) and returns them."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder; pass a folder (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"error: cannot create the output folder --out {out} ({err.strerror}); pass a folder "
                         "you can write to") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise SystemExit(f"error: the output folder --out {out} is not writable; pass a folder you can write to")
    if (out / CHECKPOINT_NAME).is_dir():
        raise SystemExit(f"error: {out / CHECKPOINT_NAME} is a folder; the checkpoint is written there. Move it "
                         "away or pass another --out")
    return remove_stale_temp_files(out)


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Clear error for non-positive integer flags."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: {flag} must be >= 1, got {value}")


# ---------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None) -> Dist:
    """Initialise ``torch.distributed`` when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Backend: nccl on CUDA, gloo on CPU. Each process uses ``cuda:$LOCAL_RANK`` on GPUs. A plain
    ``python script.py`` run is a world of one and initialises nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device(f"cuda:{local}" if world > 1 else "cuda") if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise SystemExit(f"error: --device {device!r} is not a torch device ({err}); pass e.g. cpu, cuda "
                             "or cuda:1") from err
        if dev.type == "meta":
            raise SystemExit("error: --device meta holds shapes but no values, so nothing can be trained or "
                             "measured on it; pass --device cpu or cuda")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"error: --device {device} asked for CUDA but torch.cuda.is_available() is "
                             "False; pass --device cpu")
        if dev.type == "cuda" and world > 1 and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world, device=dev)


# ----------------------------------------------------------------------------- CPU allocator
#: ``mallopt`` parameter numbers from glibc's ``<malloc.h>``.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's own ceiling for its dynamic mmap threshold on 64-bit systems
#: (``DEFAULT_MMAP_THRESHOLD_MAX``), the largest value older glibc versions accept from ``mallopt``.
MMAP_THRESHOLD = 32 << 20
#: Freed heap memory glibc may hold before it returns the top of the heap to the OS.
TRIM_THRESHOLD = 1 << 30


def tune_cpu_allocator() -> str:
    """Raise glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB.

    glibc serves a request above its mmap threshold with fresh pages from ``mmap`` and unmaps them
    on ``free``; it raises that threshold on its own only up to the size of blocks freed so far.
    A CPU training step allocates the same large activations and gradients every step, so the
    blocks above the threshold are page-faulted in afresh (one fault per 4 KiB page, zero-filled by
    the kernel) on every step. With the thresholds raised, freed blocks stay in the heap and are
    reused. Nothing numerical changes. ``python benchmarks/bench_allocator.py`` measures what it
    saves on the examples' training steps (each in fresh processes, tuned and untuned alternating).

    Returns a short description of what was done; raises ``RuntimeError`` if glibc refuses a
    value. Off glibc (macOS, musl) it changes nothing and says so.
    """
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return f"left as is (C library {libc_name or 'unknown'}, not glibc)"
    libc = ctypes.CDLL("libc.so.6")
    for param, value, name in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
                               (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD")):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc mallopt({name}, {value}) failed; run with --no-alloc-tuning")
    return f"glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"


def setup_runtime(args: argparse.Namespace) -> Dist:
    """:func:`setup_distributed` for ``--device``, then :func:`tune_cpu_allocator` on the CPU
    unless ``--no-alloc-tuning`` (what it did goes to stderr on rank 0)."""
    d = setup_distributed(args.device)
    if d.device.type == "cpu" and not args.no_alloc_tuning:
        line = tune_cpu_allocator()
        if d.is_main:
            print(f"allocator: {line} (--no-alloc-tuning leaves it as it is)", file=sys.stderr)
    return d


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# ----------------------------------------------------------------------------------------- data
class ShardedBatches:
    """Deterministic minibatches of ``data`` for rank ``rank`` of ``world_size``.

    Epoch ``e`` uses the permutation drawn from ``torch.Generator().manual_seed(seed + e)``;
    rank ``r`` takes every ``world_size``-th index starting at ``r`` (like DistributedSampler),
    and ``batch(step)`` is a pure function of the step: no sampler state to checkpoint.
    """

    def __init__(self, data: Tensor, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 labels: Tensor | None = None) -> None:
        per_rank = data.shape[0] // world_size
        if batch_size > per_rank:
            raise ValueError(f"--batch-size {batch_size} is larger than this process's share of the data "
                             f"({per_rank} images); use a smaller batch or more data")
        self.data, self.labels = data, labels
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.steps_per_epoch = per_rank // batch_size
        self._epoch = -1
        self._shard: Tensor | None = None

    def indices(self, step: int) -> Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            perm = torch.randperm(self.data.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))
            self._shard = perm[self.rank::self.world_size]
            self._epoch = epoch
        assert self._shard is not None
        return self._shard[pos * self.batch_size:(pos + 1) * self.batch_size]

    def batch(self, step: int, device: torch.device) -> Tensor:
        return self.data[self.indices(step)].to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA) and Python ``random`` states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(d: Dist) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state` (a collective call under torchrun), indexed by rank."""
    mine = rng_state()
    if not d.enabled:
        return [mine]
    states: list[Any] = [None] * d.world_size
    dist.all_gather_object(states, mine)
    return states


# ---------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write ``out/checkpoint.pt`` atomically (temp file + rename: never half-written)."""
    return atomic_torch_save(state, out / CHECKPOINT_NAME)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (on the CPU), with ``SystemExit``
    naming the file and the fix if it is missing, unreadable or not such a checkpoint."""
    if not path.is_file():
        raise SystemExit(f"error: --resume given but {path} does not exist; run without --resume to start "
                         "a new run, or pass the --out folder of the run to continue")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # any unpickling/zip/EOF failure: the file is not a usable checkpoint
        raise SystemExit(
            f"error: {path} is not a readable checkpoint ({type(err).__name__}: {err}); it is corrupt or was "
            "written by something else. Checkpoints are written atomically, so it was damaged after "
            "writing: move it away and start a new run (without --resume), or pass another --out") from err
    if not isinstance(ckpt, dict) or not {"step", "settings", "modules"} <= set(ckpt):
        raise SystemExit(f"error: {path} is not a checkpoint of these examples (no step/settings/modules "
                         "entries); pass the --out folder of an example run")
    return ckpt


def sampled_generator_state(ckpt: Mapping[str, Any]) -> dict[str, Tensor]:
    """The generator weights a checkpoint's samples come from: those of its moving average of G
    (``modules["ema"]``, a :class:`torch.optim.swa_utils.AveragedModel` state, whose ``module.``
    prefix is dropped) when the run kept one (``examples/mnist_qwgan.py --ema``), else
    ``modules["generator"]``. Load the result into the bare generator."""
    modules = ckpt["modules"]
    if "ema" not in modules:
        return dict(modules["generator"])
    return {k.removeprefix("module."): v for k, v in modules["ema"].items() if k.startswith("module.")}


def load_checkpoint(out: Path, d: Dist, expect: dict[str, Any]) -> dict[str, Any]:
    """Load ``out/checkpoint.pt`` for ``--resume``; check it belongs to this kind of run.

    ``expect``: settings that must match (e.g. ``{"model": "qwgan", "world_size": 2}``).
    """
    ckpt = read_checkpoint(out / CHECKPOINT_NAME)
    path = out / CHECKPOINT_NAME
    for key, value in expect.items():
        if ckpt["settings"].get(key) != value:
            raise SystemExit(f"error: {path} was written with {key}={ckpt['settings'].get(key)!r} but this "
                             f"run has {key}={value!r}; resume with the same setting, or use another --out")
    return ckpt


# -------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """Rows of scalar metrics written to ``out/metrics.csv`` and ``out/metrics.json``.

    ``metrics.json`` holds ``{"rows": [...], "final": {...}}``. Only rank 0 writes. ``state()``
    goes into the checkpoint so that a resumed run appends to the same history.
    """

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out, self.enabled = out, enabled
        self.rows: list[dict[str, float | int]] = []
        self.final: dict[str, Any] = {}

    def log(self, row: dict[str, float | int]) -> None:
        self.rows.append(row)

    def state(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "final": dict(self.final)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])
        self.final = dict(state["final"])

    def write(self) -> None:
        if not self.enabled:
            return
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(buf.getvalue(), self.out / "metrics.csv")
        atomic_write_text(json.dumps({"rows": self.rows, "final": self.final}, indent=1, default=_json_default)
                          + "\n", self.out / "metrics.json")


def _json_default(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ------------------------------------------------------------------------------------- Ctrl-C
class StopFlag:
    """SIGINT (Ctrl-C) → stop at the next step boundary (checkpoint, then exit); twice → abort.

    Under torchrun every rank must stop at the same step: :meth:`should_stop` all-reduces the flag
    (one tiny collective per step, only when ``world_size > 1``).
    """

    def __init__(self, d: Dist) -> None:
        self.d = d
        self.requested = False
        self._previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.d.is_main:
            print("\nCtrl-C: stopping after this step and writing a checkpoint "
                  "(press Ctrl-C again to abort without saving)", file=sys.stderr)

    def should_stop(self) -> bool:
        return self.poll(False)[0]

    def poll(self, nonfinite: bool) -> tuple[bool, bool]:
        """``(stop requested, a loss non-finite)`` on any rank: this rank's flags, all-reduced
        (max) under torchrun so that every rank stops at the same step."""
        if not self.d.enabled:
            return self.requested, nonfinite
        flags = torch.tensor([float(self.requested), float(nonfinite)],
                             device=self.d.device if self.d.device.type == "cuda" else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad = flags.tolist()
        return stop > 0, bad > 0

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


def nonfinite_entries(row: Mapping[str, Any]) -> dict[str, float]:
    """The float entries of a step's metrics (losses, R_BA...) that are NaN or inf.

    Example:
        >>> nonfinite_entries({"step": 3, "loss_d": 0.5, "loss_g": float("nan")})
        {'loss_g': nan}
    """
    return {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}


def nonfinite_loss_message(bad: Mapping[str, float] | str, step: int, out: Path, last_good_step: int | None,
                           lr: float | None) -> str:
    """What a run stopped by a NaN/inf loss says: which values (``bad``: the entries, or a
    description), that no checkpoint was written over the last good one, and how to resume from it
    with a lower learning rate.

    Example:
        >>> print(nonfinite_loss_message({"loss_g": float("inf")}, 7, Path("runs/x"), 5, 2e-4))
        error: loss_g = inf at step 7 (not finite): training stopped without writing a checkpoint; runs/x/checkpoint.pt (step 5) is left untouched; continue from it with a lower learning rate: the same command with --resume --lr 2e-05
    """
    if isinstance(bad, str):
        what = bad
    else:
        what = ", ".join(f"{k} = {v}" for k, v in bad.items()) or "a loss on another process"
    lower = f" --lr {lr / 10:g}" if lr is not None else " and a lower learning rate"
    if last_good_step is None:
        how = f"no checkpoint was written yet; start again with a lower learning rate (e.g.{lower})"
    else:
        how = (f"{out / CHECKPOINT_NAME} (step {last_good_step}) is left untouched; continue from it with a "
               f"lower learning rate: the same command with --resume{lower}")
    return f"error: {what} at step {step} (not finite): training stopped without writing a checkpoint; {how}"


def progress(total: int, initial: int, d: Dist, disable: bool, desc: str) -> Any:
    """A tqdm bar on rank 0 (none on the other ranks, or with ``--no-progress``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=disable or not d.is_main,
                dynamic_ncols=True)


def every(step: int, n: int, last: int) -> bool:
    """True on multiples of ``n`` and at the final step."""
    return step % n == 0 or step == last


def seed_all(seed: int) -> None:
    """Seed torch (all devices) and Python ``random``."""
    torch.manual_seed(seed)
    random.seed(seed)


@torch.no_grad()
def mnist_fid(sample: Any, n: int, real: Tensor, batch: int = 500) -> float:
    """MNIST-FID (:class:`qmm_plugin.paper.metrics.MNISTFID`) of ``n`` images from ``sample(k) -> (k,1,28,28)``
    in [-1, 1] (or of the images themselves when ``sample`` is a tensor) against ``real``
    (uint8 ``(N, 28, 28)`` or float in [-1, 1])."""
    from qmm_plugin.paper.metrics import MNISTFID

    fid = MNISTFID()
    fid.update(real, real=True)
    if isinstance(sample, Tensor):
        fid.update(sample, real=False)
        return fid.compute()
    done = 0
    while done < n:
        k = min(batch, n - done)
        fid.update(sample(k).float().cpu(), real=False)
        done += k
    return fid.compute()


# ---------------------------------------------------------------------------------- train loop
class TrainRun:
    """The loop shared by the training examples: resume, progress bar, logging, sample grids,
    atomic checkpoints, Ctrl-C.

    Args:
        args: parsed arguments (the common flags).
        d: from :func:`setup_distributed`.
        settings: values a ``--resume`` must match (``model``, ``world_size``...).
        modules / optimizers: saved and restored by name (the unwrapped modules, not DDP wrappers).

    ``run(step_fn, sample_fn)``: ``step_fn(step) -> {metric: float}`` does one training step
    (1-based step numbers); ``sample_fn(step) -> {metric: float}`` runs on rank 0 every
    ``--sample-every`` steps and at the end (writes the grid, returns costly metrics).

    Guards: ``--out`` is checked and its stale temp files removed at construction
    (:func:`prepare_output_dir`); a resumed run with a changed ``--lr`` applies it to the restored
    optimisers (every group's rate scaled by new / saved); a NaN/inf value in a step's metrics, or
    a non-finite parameter when a checkpoint is due, stops the run before that checkpoint is
    written (:data:`NONFINITE_EXIT`).
    """

    def __init__(self, args: argparse.Namespace, d: Dist, settings: dict[str, Any],
                 modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.args, self.d, self.settings = args, d, settings
        self.modules, self.optimizers = modules, optimizers
        self.out = Path(args.out)
        self.log = MetricsLog(self.out, enabled=d.is_main)
        self.start = 0
        self.last_checkpoint: int | None = None  # step of the last good checkpoint in --out
        if d.is_main:
            for stale in prepare_output_dir(self.out):
                print(f"removed {stale} (left by an interrupted write)", file=sys.stderr)
        if args.resume:
            ckpt = load_checkpoint(self.out, d, settings)
            for name, m in modules.items():
                m.load_state_dict(ckpt["modules"][name])
            saved_lr, lr = ckpt.get("args", {}).get("lr"), getattr(args, "lr", None)
            for name, o in optimizers.items():
                o.load_state_dict(ckpt["optimizers"][name])
                if lr is not None and saved_lr and lr != saved_lr:
                    for group in o.param_groups:
                        group["lr"] *= lr / saved_lr
            self.last_checkpoint = ckpt["step"]
            self.log.load_state(ckpt["metrics"])
            set_rng_state(ckpt["rng"][d.rank])
            self.start = ckpt["step"]
            if d.is_main:
                print(f"resumed {self.out / CHECKPOINT_NAME} at step {self.start}", file=sys.stderr)
        else:
            torch.manual_seed(args.seed + 1000 * d.rank)  # different latents/noise on every rank
            if d.is_main and (self.out / CHECKPOINT_NAME).exists():
                print(f"note: {self.out / CHECKPOINT_NAME} exists and will be overwritten (pass --resume "
                      "to continue it instead)", file=sys.stderr)

    def checkpoint(self, step: int) -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes, atomically."""
        rng = gather_rng_states(self.d)
        if self.d.is_main:
            self.log.write()
            save_checkpoint(self.out, {
                "step": step, "settings": self.settings, "args": vars(self.args),
                "modules": {n: m.state_dict() for n, m in self.modules.items()},
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "metrics": self.log.state(), "rng": rng})
        self.last_checkpoint = step

    def _nonfinite_parameter(self, step: int) -> str | None:
        """The message of the first module with a NaN/inf parameter or buffer, or None."""
        for name, m in self.modules.items():
            try:
                check_finite_state(m, f"module '{name}'")
            except ValueError as err:
                return str(err).split(";")[0]
        return None

    def _stop_nonfinite(self, bad: Mapping[str, float] | str, step: int) -> int:
        if self.d.is_main:
            print(nonfinite_loss_message(bad, step, self.out, self.last_checkpoint, getattr(self.args, "lr", None)),
                  file=sys.stderr)
        return NONFINITE_EXIT

    def run(self, step_fn: Any, sample_fn: Any, desc: str) -> int:
        """Train from ``self.start`` to ``--steps``; returns 0, 130 after a Ctrl-C stop, or
        :data:`NONFINITE_EXIT` when a metric turned NaN/inf (no checkpoint written over the last
        good one)."""
        a, d = self.args, self.d
        stop = StopFlag(d)
        bar = progress(a.steps, self.start, d, a.no_progress, desc)
        t0 = time.perf_counter()
        try:
            for step in range(self.start + 1, a.steps + 1):
                row: dict[str, float | int] = {"step": step, **step_fn(step)}
                bar.update(1)
                bad = nonfinite_entries(row)
                stop_requested, any_bad = stop.poll(bool(bad))
                if any_bad:
                    return self._stop_nonfinite(bad, step)
                sample = every(step, a.sample_every, a.steps)
                if sample and d.is_main:
                    row.update(sample_fn(step))
                if every(step, a.log_every, a.steps) or sample:
                    row["sec_per_step"] = (time.perf_counter() - t0) / (step - self.start)
                    self.log.log(row)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k.startswith("loss")})
                checkpointed = every(step, a.ckpt_every, a.steps) or stop_requested
                if checkpointed:
                    broken = self._nonfinite_parameter(step)
                    if broken is not None:  # keep the last good checkpoint
                        return self._stop_nonfinite(broken, step)
                    self.checkpoint(step)
                if stop_requested:
                    if d.is_main:
                        print(f"stopped at step {step}; checkpoint written, continue with --resume",
                              file=sys.stderr)
                    return 130
            if self.start == a.steps and d.is_main:  # resumed a finished run: just re-evaluate
                sample_fn(a.steps)
        finally:
            bar.close()
            stop.restore()
        return 0

    def finish(self, final: dict[str, Any]) -> None:
        """Record end-of-run metrics (e.g. the FID) in ``metrics.json`` (rank 0)."""
        self.log.final.update(final)
        self.log.write()


def average_gradients(params: list[nn.Parameter], d: Dist) -> None:
    """All-reduce (mean) the gradients of ``params`` across ranks: data parallelism for models
    that are not called through a DistributedDataParallel wrapper."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ------------------------------------------------------------------------- flat example runs
class FlatRun:
    """Save, resume and stop for an example whose loop is written out in the script::

        start = run.resume()                       # --resume: state from OUT/checkpoint.pt, else 0
        for step in run.steps(start, "name"):      # progress bar, checkpoints; Ctrl-C: save, exit 130
            row = {"step": step, **train_step(step)}
            run.record(row, step, report)          # log; NaN/inf: exit 3, the last good checkpoint kept
        run.finish({"mnist_fid": ...}, report, "name")

    The script keeps its loop; this keeps the bookkeeping every such loop needs the same way:
    :meth:`resume` restores modules, optimisers, metrics and RNG (a changed ``--lr`` applies from
    there); :meth:`steps` checkpoints every ``--ckpt-every`` steps, at the last step and on Ctrl-C;
    :meth:`record` logs rows and takes the manifold-class report; :meth:`finish` writes the final
    metrics and prints the report. A stop exits through :class:`SystemExit` with
    :data:`INTERRUPTED_EXIT` (Ctrl-C, after its checkpoint) or :data:`NONFINITE_EXIT`.
    """

    def __init__(self, args: argparse.Namespace, d: Dist, settings: dict[str, Any],
                 modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.args, self.settings, self.modules, self.optimizers = args, settings, modules, optimizers
        self.out = Path(args.out)
        self.log = MetricsLog(self.out, enabled=True)
        self.stop = StopFlag(d)
        self.d = d
        self.last_good: int | None = None
        self.bar: Any = None
        self.report: ManifoldClassReport | None = None
        self._clock: tuple[int, float] | None = None

    def resume(self) -> int:
        """The step to continue after: 0 for a new run, else the checkpoint's (state restored)."""
        if not self.args.resume:
            return 0
        ckpt = read_checkpoint(self.out / CHECKPOINT_NAME)
        for name, m in self.modules.items():
            m.load_state_dict(ckpt["modules"][name])
        for name, o in self.optimizers.items():
            lrs = [group["lr"] for group in o.param_groups]  # what this command's flags set
            o.load_state_dict(ckpt["optimizers"][name])
            for group, lr in zip(o.param_groups, lrs):  # a changed --lr applies from here on
                group["lr"] = lr
        self.log.load_state(ckpt["metrics"])
        set_rng_state(ckpt["rng"])
        self.last_good = ckpt["step"]
        print(f"resumed {self.out / CHECKPOINT_NAME} at step {ckpt['step']}", file=sys.stderr)
        return ckpt["step"]

    def save(self, step: int) -> None:
        """Write ``metrics.*`` and ``checkpoint.pt`` (atomically) for ``step``."""
        self.log.write()
        save_checkpoint(self.out, {"step": step, "args": vars(self.args), "settings": self.settings,
                                   "metrics": self.log.state(), "rng": rng_state(),
                                   "modules": {n: m.state_dict() for n, m in self.modules.items()},
                                   "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}})
        self.last_good = step

    def steps(self, start: int, desc: str) -> Iterator[int]:
        """Steps ``start + 1 .. --steps`` under a progress bar (``--no-progress``: none). After each
        step's body: a checkpoint every ``--ckpt-every`` steps and at the last; after a Ctrl-C, a
        checkpoint, then ``SystemExit(INTERRUPTED_EXIT)``."""
        self.bar = progress(self.args.steps, start, self.d, self.args.no_progress, desc)
        self._clock = (start, time.perf_counter())
        try:
            for step in range(start + 1, self.args.steps + 1):
                yield step
                self.bar.update(1)
                if (code := self.end_step(step)) is not None:
                    self.stop.restore()
                    raise SystemExit(code)
        finally:
            self.bar.close()

    def record(self, row: dict[str, Any], step: int,
               report: Callable[[int], ManifoldClassReport] | None = None, postfix: Sequence[str] = ()) -> None:
        """After a step's training: a non-finite entry in ``row`` stops the run before any checkpoint
        overwrites the last good one (message, ``SystemExit(NONFINITE_EXIT)``). Else, every
        ``--sample-every`` steps and at the last, ``report(step)`` is taken (kept as :attr:`report`),
        its scalars join the row and its headline is printed; the row (with ``sec_per_step``, the
        mean seconds per step of this process's loop so far) is logged every ``--log-every`` steps and
        with every report, and its ``postfix`` entries show on the progress bar."""
        if (code := self.guard(row, step)) is not None:
            self.stop.restore()
            raise SystemExit(code)
        if self._clock is not None:  # training seconds per step since this process started the loop
            row["sec_per_step"] = (time.perf_counter() - self._clock[1]) / max(step - self._clock[0], 1)
        reported = report is not None and every(step, self.args.sample_every, self.args.steps)
        if reported:
            self.report = report(step)
            row.update(self.report.scalars())
            self.write(f"step {step}: {self.report.headline()}")
        if reported or every(step, self.args.log_every, self.args.steps):
            self.log.log(row)
            if self.bar is not None and postfix:
                self.bar.set_postfix({k: f"{row[k]:.4g}" for k in postfix})

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text)

    def guard(self, row: Mapping[str, Any], step: int) -> int | None:
        """:data:`NONFINITE_EXIT` (and the message) when ``row`` holds a NaN/inf, else ``None``."""
        bad = nonfinite_entries(row)
        if not bad:
            return None
        print(nonfinite_loss_message(bad, step, self.out, self.last_good, getattr(self.args, "lr", None)),
              file=sys.stderr)
        return NONFINITE_EXIT

    def end_step(self, step: int) -> int | None:
        """Checkpoint when due or after a Ctrl-C; :data:`INTERRUPTED_EXIT` after a Ctrl-C, else ``None``."""
        stopping = self.stop.should_stop()
        if every(step, self.args.ckpt_every, self.args.steps) or stopping:
            self.save(step)
        if stopping:
            print(f"stopped at step {step}; continue with --resume", file=sys.stderr)
            return INTERRUPTED_EXIT
        return None

    def finish(self, final: dict[str, Any], report: Callable[[int], ManifoldClassReport] | None = None,
               title: str = "run") -> int:
        """End of run: the last report of the loop (or ``report(--steps)`` for a resumed, finished
        run) joins ``final`` as ``final["report"]``; ``final`` goes to ``metrics.json``; the report's
        table and a one-line summary are printed. Restores the Ctrl-C handler; returns 0."""
        self.stop.restore()
        rep = self.report if self.report is not None or report is None else report(self.args.steps)
        if rep is not None:
            final = {**final, "report": rep.summary()}
        self.log.final.update(final)
        self.log.write()
        line = f"{title}, step {self.args.steps}"
        if rep is not None:
            print(rep.format())
            line += (f": NMI {rep.nmi:.3f}, {rep.distinct_majorities} distinct majority classes, "
                     f"{rep.confident:.0%} confident")
        if "mnist_fid" in final:
            line += f", MNIST-FID {final['mnist_fid']:.2f}"
        print(f"{line}; outputs in {self.out}/")
        return 0
