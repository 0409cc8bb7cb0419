"""GRPO under a 2-process CPU launch agrees with one process on the same global batch: groups never cross
processes (each holds whole groups), sampling seeds are per sample, and losses are normalised globally."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from test_critic_free import make

from otalign.trainers import read_metrics

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BETA = {"beta": 0.5, "beta_target": 0.01, "beta_horizon": 10.0}
WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_critic_free import make

    trainer = make({out!r}, per_device_train_batch_size=4, regularizer="wasserstein", loss_type="bnpo", **{beta!r})
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    total = sum(float(p.detach().double().sum()) for p in policy.parameters())
    with open({out!r} + f"/params-{{trainer.accelerator.process_index}}.json", "w") as f:
        json.dump(total, f)
    """
)


def test_two_processes_match_one_process(tmp_path, two_process_script):
    out = tmp_path / "two"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), out=str(out), beta=BETA))
    two_process_script(script, 29523)

    one = make(tmp_path / "one", per_device_train_batch_size=8, regularizer="wasserstein", loss_type="bnpo", **BETA)
    one.train()
    total_one = sum(float(p.detach().double().sum()) for p in one.accelerator.unwrap_model(one.policy).parameters())

    rank_totals = [json.loads((out / f"params-{rank}.json").read_text()) for rank in (0, 1)]
    assert rank_totals[0] == rank_totals[1]
    assert rank_totals[0] == pytest.approx(total_one, rel=1e-6)
    rows_two, rows_one = read_metrics(out), read_metrics(tmp_path / "one")
    assert [r["step"] for r in rows_two] == [1, 2]
    for a, b in zip(rows_two, rows_one, strict=True):
        for key in ("reward/group_std", "reward/zero_std_frac", "advantage/abs_mean", "beta", "loss/policy"):
            assert key in b
        for key, value in b.items():
            if key.startswith("time/") or value is None:
                continue
            assert a[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
