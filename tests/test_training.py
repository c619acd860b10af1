"""The examples' training machinery (``qmm_plugin.paper.training``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qmm_plugin.paper.training import MetricsLog, ShardedBatches


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
