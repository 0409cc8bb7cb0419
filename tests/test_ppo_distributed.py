"""PPO under ``accelerate launch --num_processes 2 --cpu`` agrees with one process on the same global batch.

Rollouts do not depend on how the batch is split (per-sample sampling seeds), whitening and loss
normalisation use global statistics, and data-parallel gradients are averaged: so two processes with 2
rollouts each must reproduce one process with 4, up to floating-point reduction order.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from test_ppo import make_trainer

from otalign.trainers import read_metrics

pytestmark = pytest.mark.usefixtures("torch_single_thread")

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_ppo import make_trainer

    trainer = make_trainer({out!r}, max_steps=2, per_device_train_batch_size=2, regularizer="wasserstein",
                           save_steps=2)
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
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), out=str(out)))
    two_process_script(script, 29517)

    one = make_trainer(tmp_path / "one", max_steps=2, per_device_train_batch_size=4, regularizer="wasserstein")
    one.train()
    total_one = sum(float(p.detach().double().sum()) for p in one.accelerator.unwrap_model(one.policy).parameters())

    rank_totals = [json.loads((out / f"params-{rank}.json").read_text()) for rank in (0, 1)]
    assert rank_totals[0] == rank_totals[1]  # data-parallel replicas stay identical
    assert rank_totals[0] == pytest.approx(total_one, rel=1e-6)
    rows_two, rows_one = read_metrics(out), read_metrics(tmp_path / "one")
    assert [r["step"] for r in rows_two] == [1, 2]
    for a, b in zip(rows_two, rows_one, strict=True):
        for key, value in b.items():
            if key.startswith("time/") or value is None:
                continue
            assert a[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
