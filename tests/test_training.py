"""The examples' training machinery (``qmm_plugin.paper.training``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from qmm_plugin.io import atomic_torch_save, atomic_write_text, stale_temp_files
from qmm_plugin.paper.training import (
    CHECKPOINT_NAME,
    NONFINITE_EXIT,
    Dist,
    MetricsLog,
    ShardedBatches,
    TrainRun,
    apply_smoke,
    check_resume_args,
    explicit_flags,
    nonfinite_loss_message,
    prepare_output_dir,
    read_checkpoint,
    resume_settings,
    sampled_generator_state,
    save_checkpoint,
    setup_distributed,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_sharded_batches_are_deterministic_and_disjoint_across_ranks() -> None:
    data = torch.arange(100).float()
    shards = [ShardedBatches(data, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    epoch0 = [torch.cat([s.batch(k, torch.device("cpu")) for k in range(5)]) for s in shards]
    assert set(epoch0[0].tolist()).isdisjoint(epoch0[1].tolist())
    assert sorted(torch.cat(epoch0).tolist()) == list(range(100))
    again = ShardedBatches(data, 10, seed=3, rank=1, world_size=2)
    assert torch.equal(again.batch(7, torch.device("cpu")), shards[1].batch(7, torch.device("cpu")))
    assert not torch.equal(shards[0].batch(0, torch.device("cpu")), shards[0].batch(5, torch.device("cpu")))


def test_metrics_log_writes_csv_and_json(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=True)
    log.log({"step": 1, "loss": 0.5})
    log.log({"step": 2, "loss": 0.25, "fid": 3.0})
    log.final["mnist_fid"] = 3.0
    log.write()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,loss,fid" and lines[1] == "1,0.5," and lines[2] == "2,0.25,3.0"
    assert json.loads((tmp_path / "metrics.json").read_text())["final"] == {"mnist_fid": 3.0}


# ----------------------------------------------------------------------------- flags and --smoke
def smoke_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sample-every", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--smoke", action="store_true")
    return p


def test_explicit_flags_sees_given_flags_even_at_their_default() -> None:
    p = smoke_parser()
    assert explicit_flags(p, ["--steps", "400", "--smoke"]) == {"steps", "smoke"}
    assert explicit_flags(p, []) == frozenset()
    assert explicit_flags(p, ["--batch-size=8"]) == {"batch_size"}
    p.add_argument("data")  # a required positional is a given flag
    assert explicit_flags(p, ["d", "--lr", "0.1"]) == {"data", "lr"}


def test_smoke_never_overrides_a_given_flag() -> None:
    p = smoke_parser()
    argv = ["--smoke", "--batch-size", "8"]
    args = p.parse_args(argv)
    set_ = apply_smoke(args, explicit_flags(p, argv),
                       {"steps": 4, "batch_size": 20, "sample_every": lambda a: a.steps})
    assert set_ == {"steps", "sample_every"}
    assert (args.steps, args.batch_size, args.sample_every) == (4, 8, 4)
    argv = ["--smoke", "--steps", "7"]
    args = p.parse_args(argv)
    apply_smoke(args, explicit_flags(p, argv), {"steps": 4, "sample_every": lambda a: a.steps})
    assert (args.steps, args.sample_every) == (7, 7)  # the callable sees the user's steps


def test_example_smoke_keeps_the_users_flags() -> None:
    spec = importlib.util.spec_from_file_location("mnist_qbvae", EXAMPLES / "mnist_qbvae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--smoke", "--batch-size", "5"])
    assert (args.batch_size, args.steps, args.em_repeats) == (5, 2, 2)
    with pytest.raises(SystemExit, match="--em-repeats must be >= 1, got 0"):
        module.parse_args(["--smoke", "--em-repeats", "0"])


def test_generalize_smoke_keeps_inv_steps_zero_and_refuses_it(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generalize", EXAMPLES / "generalize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit, match="--inv-steps must be >= 1, got 0"):
        module.main(["--smoke", "--inv-steps", "0", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------- --resume
SAVED = {"steps": 400, "batch_size": 32, "lr": 2e-4, "sample_every": 100, "smoke": False, "resume": False}


def test_resume_takes_the_checkpoints_value_for_flags_not_given() -> None:
    args = argparse.Namespace(steps=400, batch_size=32, lr=2e-4, sample_every=50, smoke=False, resume=True)
    saved = dict(SAVED, lr=1e-3, sample_every=25)
    assert check_resume_args(saved, 300, args, {"resume"}) == []
    assert (args.lr, args.sample_every, args.resume) == (1e-3, 25, True)


def test_resume_applies_changeable_flags_and_says_so() -> None:
    args = argparse.Namespace(**dict(SAVED, steps=800, lr=1e-4, resume=True))
    notes = check_resume_args(SAVED, 400, args, {"steps", "lr", "resume"})
    assert notes == ["--steps 800 (the checkpoint has 400): applies from step 401",
                     "--lr 0.0001 (the checkpoint has 0.0002): applies from step 401"]
    assert (args.steps, args.lr) == (800, 1e-4)


def test_resume_refuses_a_flag_that_cannot_change() -> None:
    args = argparse.Namespace(**dict(SAVED, batch_size=8, resume=True))
    with pytest.raises(SystemExit, match=r"--batch-size 8 differs from the checkpoint's 32, and a resumed run "
                                         r"cannot change it \(flags that can change: .*--lr.*\); resume without "
                                         r"--batch-size, or start a new run in another --out"):
        check_resume_args(SAVED, 100, args, {"batch_size", "resume"})


def test_resume_refuses_steps_below_the_saved_step() -> None:
    args = argparse.Namespace(**dict(SAVED, steps=50, resume=True))
    with pytest.raises(SystemExit, match=r"--steps 50 is below the checkpoint's step 100; pass --steps >= 100"):
        check_resume_args(SAVED, 100, args, {"steps", "resume"})
    args = argparse.Namespace(**dict(SAVED, steps=100, resume=True))
    assert check_resume_args(SAVED, 100, args, {"steps", "resume"})  # equal: re-evaluate, with a note


def test_resume_settings_reads_the_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"step": 10, "settings": {}, "modules": {}, "args": dict(SAVED, lr=5e-4)})
    args = argparse.Namespace(**dict(SAVED, out=str(tmp_path), resume=True))
    assert resume_settings(args, {"resume", "out"}) == []
    assert args.lr == 5e-4
    assert resume_settings(argparse.Namespace(resume=False), set()) == []


# ------------------------------------------------------------------------------- checkpoints
def test_corrupt_checkpoint_is_named_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(tmp_path, {"step": 1, "settings": {}, "modules": {}})
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(SystemExit, match=r"checkpoint.pt is not a readable checkpoint \(.*\); it is corrupt .* "
                                         r"move it away and start a new run"):
        read_checkpoint(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        read_checkpoint(path)
    torch.save({"weights": 1}, path)
    with pytest.raises(SystemExit, match="not a checkpoint of these examples"):
        read_checkpoint(path)
    path.unlink()
    with pytest.raises(SystemExit, match="does not exist; run without --resume"):
        read_checkpoint(path)


# ------------------------------------------------------------------------------- output folder
def test_prepare_output_dir_refuses_a_file_and_a_checkpoint_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"--out .*file is a file, not a folder"):
        prepare_output_dir(tmp_path / "file")
    with pytest.raises(SystemExit, match=r"cannot create the output folder --out .*file/sub"):
        prepare_output_dir(tmp_path / "file" / "sub")
    (tmp_path / "run" / CHECKPOINT_NAME).mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"checkpoint.pt is a folder"):
        prepare_output_dir(tmp_path / "run")
    assert prepare_output_dir(tmp_path / "new" / "deeper") == [] and (tmp_path / "new" / "deeper").is_dir()


def test_prepare_output_dir_removes_stale_temp_files_only(tmp_path: Path) -> None:
    stale = [tmp_path / ".checkpoint.pt.k2j4xq8a.tmp", tmp_path / ".metrics.csv.0a_b9c7d.tmp"]
    kept = [tmp_path / ".hidden.tmp", tmp_path / "notes.tmp", tmp_path / ".checkpoint.pt.short.tmp"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert prepare_output_dir(tmp_path) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    before = os.umask(mask)
    try:
        path = atomic_write_text("x", tmp_path / "a.txt")
        assert stat.S_IMODE(path.stat().st_mode) == mode
        assert stat.S_IMODE(atomic_torch_save({"a": 1}, tmp_path / "b.pt").stat().st_mode) == mode
    finally:
        os.umask(before)
    assert stale_temp_files(tmp_path) == []


@pytest.mark.parametrize("device, match", [("meta", "--device meta holds shapes but no values"),
                                           ("gpu", "--device 'gpu' is not a torch device")])
def test_device_flag_errors(device: str, match: str) -> None:
    with pytest.raises(SystemExit, match=match):
        setup_distributed(device)


# ------------------------------------------------------------------------------ NaN/inf guard
def train_args(out: Path, steps: int, resume: bool = False, lr: float = 0.1) -> argparse.Namespace:
    return argparse.Namespace(out=str(out), resume=resume, seed=0, steps=steps, lr=lr, no_progress=True,
                              sample_every=100, log_every=1, ckpt_every=2)


def toy_run(out: Path, steps: int, resume: bool = False, lr: float = 0.1) -> tuple[TrainRun, nn.Linear,
                                                                                    torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    d = Dist(rank=0, world_size=1, device=torch.device("cpu"))
    return TrainRun(train_args(out, steps, resume, lr), d, {"model": "toy"}, {"m": model}, {"sgd": opt}), model, opt


def test_nonfinite_loss_stops_before_the_next_checkpoint(tmp_path: Path, capsys) -> None:
    run, model, opt = toy_run(tmp_path, steps=6)

    def step(k: int) -> dict[str, float]:
        loss = model(torch.ones(1, 3)).sum() * (float("nan") if k == 3 else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    assert run.run(step, lambda k: {}, "toy") == NONFINITE_EXIT
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["modules"]["m"].values())
    err = capsys.readouterr().err
    assert "loss = nan at step 3 (not finite): training stopped without writing a checkpoint" in err
    assert f"{tmp_path / CHECKPOINT_NAME} (step 2) is left untouched" in err
    assert "the same command with --resume --lr 0.01" in err


def test_nonfinite_parameter_is_not_checkpointed(tmp_path: Path, capsys) -> None:
    run, model, _ = toy_run(tmp_path, steps=6)

    def step(k: int) -> dict[str, float]:
        if k == 4:
            with torch.no_grad():
                model.weight[0, 1] = float("inf")
        return {"loss": 1.0}

    assert run.run(step, lambda k: {}, "toy") == NONFINITE_EXIT
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["step"] == 2
    assert "module 'm': parameter 'weight' holds 1 non-finite" in capsys.readouterr().err


def test_nonfinite_before_any_checkpoint_says_to_start_again() -> None:
    msg = nonfinite_loss_message({"loss_g": float("inf")}, 1, Path("runs/x"), None, 2e-4)
    assert "no checkpoint was written yet; start again with a lower learning rate (e.g. --lr 2e-05)" in msg


def test_resume_with_a_lower_lr_applies_it_to_the_optimisers(tmp_path: Path) -> None:
    run, model, opt = toy_run(tmp_path, steps=2)
    assert run.run(lambda k: {"loss": 1.0}, lambda k: {}, "toy") == 0
    resumed, _, opt2 = toy_run(tmp_path, steps=4, resume=True, lr=0.01)
    assert resumed.start == 2 and opt2.param_groups[0]["lr"] == pytest.approx(0.01)


def test_flat_run_saves_resumes_and_guards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qmm_plugin.paper.training import NONFINITE_EXIT, Dist, FlatRun

    def make(resume: bool, lr: float) -> tuple[FlatRun, nn.Linear, torch.optim.Adam]:
        args = argparse.Namespace(out=str(tmp_path), resume=resume, lr=lr, steps=4, ckpt_every=2)
        lin = nn.Linear(3, 2)
        opt = torch.optim.Adam(lin.parameters(), lr=lr)
        return FlatRun(args, Dist(0, 1, torch.device("cpu")), {"model": "t"}, {"m": lin}, {"o": opt}), lin, opt

    run, lin, _ = make(resume=False, lr=1e-3)
    assert run.resume() == 0
    assert run.guard({"loss": 1.0}, 1) is None and run.end_step(1) is None
    assert not (tmp_path / "checkpoint.pt").exists()          # step 1: no checkpoint due
    run.log.log({"step": 2, "loss": 0.5})
    assert run.end_step(2) is None and run.last_good == 2      # every --ckpt-every steps
    assert run.guard({"loss": float("nan")}, 3) == NONFINITE_EXIT
    assert "step 2" in capsys.readouterr().err                 # names the last good checkpoint
    run.stop.restore()

    again, lin2, opt2 = make(resume=True, lr=5e-4)
    assert again.resume() == 2
    assert torch.equal(lin2.weight, lin.weight)
    assert opt2.param_groups[0]["lr"] == 5e-4                   # a changed --lr applies on resume
    assert again.log.rows[-1]["loss"] == 0.5
    again.stop.restore()


def test_flat_run_loop_reports_logs_and_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``steps`` + ``record`` + ``finish``: a report every --sample-every steps and at the last, rows
    logged, checkpoints when due; Ctrl-C saves and exits 130; a NaN row exits 3 without saving."""
    from types import SimpleNamespace

    from qmm_plugin.paper.training import INTERRUPTED_EXIT, NONFINITE_EXIT, Dist, FlatRun

    def make(steps: int) -> FlatRun:
        args = argparse.Namespace(out=str(tmp_path), resume=False, lr=1e-3, steps=steps, ckpt_every=4,
                                  sample_every=3, log_every=2, no_progress=True)
        return FlatRun(args, Dist(0, 1, torch.device("cpu")), {"model": "t"}, {"m": nn.Linear(2, 2)}, {})

    reported: list[int] = []

    def report(step: int) -> SimpleNamespace:
        reported.append(step)
        return SimpleNamespace(scalars=lambda: {"report/nmi": step / 10}, headline=lambda: f"NMI {step / 10}",
                               summary=lambda: {"nmi": step / 10}, format=lambda: "TABLE", nmi=step / 10,
                               distinct_majorities=7, confident=0.5)

    run = make(steps=5)
    for step in run.steps(0, "toy"):
        run.record({"step": step, "loss": 1.0}, step, report)  # type: ignore[arg-type]
    assert reported == [3, 5]
    assert [r["step"] for r in run.log.rows] == [2, 3, 4, 5]               # --log-every 2, and each report
    assert run.log.rows[1]["report/nmi"] == 0.3 and "step 3: NMI 0.3" in capsys.readouterr().out
    assert all(r["sec_per_step"] > 0 for r in run.log.rows)                # timing rides along
    assert run.last_good == 5                                                # the last step is saved
    assert run.finish({"mnist_fid": 12.5}, report, "toy") == 0               # type: ignore[arg-type]
    assert reported == [3, 5] and run.log.final == {"mnist_fid": 12.5, "report": {"nmi": 0.5}}
    assert "toy, step 5: NMI 0.500, 7 distinct majority classes, 50% confident, MNIST-FID 12.50" in \
        capsys.readouterr().out

    run = make(steps=8)
    with pytest.raises(SystemExit) as stop:
        for step in run.steps(0, "toy"):
            if step == 2:
                run.stop.requested = True                                    # as Ctrl-C does
    assert stop.value.code == INTERRUPTED_EXIT == 130 and run.last_good == 2

    run = make(steps=8)
    with pytest.raises(SystemExit) as stop:
        for step in run.steps(0, "toy"):
            run.record({"step": step, "loss": float("nan") if step == 5 else 1.0}, step)
    assert stop.value.code == NONFINITE_EXIT and run.last_good == 4         # step 5 wrote nothing
    assert "not finite" in capsys.readouterr().err


def test_sampled_generator_state_is_the_moving_average_when_the_run_kept_one() -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    import qmm_plugin
    from qmm_plugin.paper.models import MNISTGenerator

    torch.manual_seed(0)
    g = qmm_plugin.convert(MNISTGenerator(z_dim=8), num_biases=3)
    ema = AveragedModel(g, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    ema.update_parameters(g)  # the first update copies G; the second averages
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    ema.update_parameters(g)
    plain = sampled_generator_state({"modules": {"generator": g.state_dict()}})
    assert plain.keys() == g.state_dict().keys() and all(torch.equal(plain[k], v) for k, v in g.state_dict().items())

    averaged = sampled_generator_state({"modules": {"generator": g.state_dict(), "ema": ema.state_dict()}})
    assert averaged.keys() == g.state_dict().keys()  # no "module." prefix, no n_averaged
    fresh = qmm_plugin.convert(MNISTGenerator(z_dim=8), num_biases=3)
    fresh.load_state_dict(averaged)
    bank = "model.fc.0.bias_bank"
    torch.testing.assert_close(fresh.state_dict()[bank], g.state_dict()[bank] - 0.5)  # halfway between the last two
