"""``--report_to tensorboard`` writes every logged scalar: a 2-step ``otalign ppo`` run read back with
TensorBoard's own event reader equals its ``metrics.jsonl``."""

from __future__ import annotations

import pytest

from otalign.trainers import read_metrics

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_tensorboard_events_hold_the_metrics_of_every_step(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from otalign.cli import main
    from otalign.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    args = ["ppo", "--model_name_or_path", model, "--output_dir", str(out), "--report_to", "tensorboard"]
    args += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--response_length", "4"]
    args += ["--regularizer", "wasserstein", "--wpr_top_k", "8", "--progress_bar", "false", "--save_model", "false"]
    assert main(args) == 0

    run_dir = out / "otalign"  # accelerate's tracker folder: <project_dir>/<project name> (hparams in a subfolder)
    assert list(run_dir.glob("events.out.tfevents.*"))
    reader = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    rows = read_metrics(out)
    logged = {key for row in rows for key in row if key != "step" and row[key] is not None}
    assert {"reward/mean", "kl/exact", "wasserstein/value", "learning_rate", "grad_norm"} <= logged
    assert set(reader.Tags()["scalars"]) == logged
    for key in logged:
        scalars = reader.Scalars(key)
        assert [s.step for s in scalars] == [row["step"] for row in rows if row.get(key) is not None], key
        expected = [row[key] for row in rows if row.get(key) is not None]
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6, abs=1e-7), key
