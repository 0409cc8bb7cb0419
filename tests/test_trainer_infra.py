"""Shared trainer infrastructure: config parsing, atomic checkpoints, metrics files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator

from otalign.trainers import (
    CheckpointManager,
    ConfigError,
    MetricsLogger,
    PPOConfig,
    TrainerConfig,
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    parse_config,
    read_metrics,
)


def test_yaml_then_overrides_map_onto_fields(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("regularizer: wasserstein\nbeta: 0.01\nreport_to: [tensorboard]\nmax_grad_norm: null\n")
    config = parse_config(
        PPOConfig, path, ["--beta", "0.5", "--max_steps=7", "--resume", "--cliprange_value", "none", "--top-k", "3"]
    )
    assert config.regularizer == "wasserstein" and config.beta == 0.5 and config.max_steps == 7
    assert config.resume is True and config.cliprange_value is None and config.top_k == 3
    assert config.report_to == ["tensorboard"] and config.max_grad_norm is None
    assert parse_config(
        PPOConfig, None, ["--use_peft", "--lora_target_modules", "q_proj,v_proj"]
    ).lora_target_modules == [
        "q_proj",
        "v_proj",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning_rat", "1"], "unknown option 'learning_rat'; did you mean learning_rate"),
        (["--max_steps", "ten"], "--max_steps: expected an integer, got 'ten'"),
        (["--use_peft", "maybe"], "--use_peft: expected true or false"),
        (["--beta"], "--beta: needs a value"),
        (["beta", "1"], "expected --key value"),
        (["--max_steps", "0"], "max_steps must be >= 1"),
        (["--regularizer", "wass"], "unknown regularizer 'wass'"),
        (["--reward_fn", "joy"], "unknown reward_fn 'joy'"),
        (["--report_to", "mlflow"], "--report_to: unknown report_to 'mlflow'"),
    ],
)
def test_bad_overrides_raise_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_config(PPOConfig, None, argv)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 3\nbogus_key: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'bogus_key'"):
        parse_config(PPOConfig, path)
    path.write_text("max_steps: true\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: max_steps: expected an integer, got True"):
        parse_config(PPOConfig, path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(PPOConfig, path)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(PPOConfig, tmp_path / "missing.yaml")


def test_parse_config_works_for_any_trainer_dataclass():
    @dataclass
    class SFTLike(TrainerConfig):
        packing: bool = False
        max_length: int = 512

    config = parse_config(SFTLike, None, ["--packing", "--max_length", "64", "--learning_rate", "1e-4"])
    assert config.packing and config.max_length == 64 and config.learning_rate == 1e-4


def test_checkpoints_are_atomic_pruned_and_restore_state(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    state = TrainerState()
    acc.register_for_checkpointing(state)
    manager = CheckpointManager(acc, tmp_path, total_limit=2)
    for step in (1, 2, 3):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        state.global_step, state.samples_seen = step, 10 * step
        manager.save(step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    # a crash mid-save leaves only a hidden temporary folder, which is never taken for a checkpoint
    (tmp_path / "checkpoints" / ".tmp-checkpoint-4").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"

    with torch.no_grad():
        model.weight.add_(1.0)
    state.global_step = 0
    torch.manual_seed(123)
    manager.load(latest_checkpoint(tmp_path))
    assert state.global_step == 3 and state.samples_seen == 30
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert optimizer.state_dict()["state"][0]["step"] == 3


def test_metrics_jsonl_truncates_on_resume(tmp_path):
    acc = Accelerator(cpu=True)
    logger = MetricsLogger(acc, tmp_path)
    for step in range(1, 5):
        logger.log({"reward/mean": float(step), "bad": float("nan")}, step)
    logger.truncate_after(2)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["bad"] is None
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["reward/mean"] == 2.0
    logger.reset()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_torn_last_metrics_line_is_skipped_and_repaired_on_resume(tmp_path):
    acc = Accelerator(cpu=True)
    logger = MetricsLogger(acc, tmp_path)
    for step in (1, 2, 3):
        logger.log({"loss": float(step)}, step)
    with (tmp_path / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    logger.truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines() == [
        '{"step": 1, "loss": 1.0}',
        '{"step": 2, "loss": 2.0}',
    ]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not valid JSON"):
        read_metrics(tmp_path)


def test_new_run_refuses_a_used_output_dir_without_resume_or_overwrite(tmp_path):
    from otalign.trainers.base import check_output_dir

    check_output_dir(PPOConfig(output_dir=str(tmp_path)))  # empty: fine
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl\); pass --resume"):
        check_output_dir(PPOConfig(output_dir=str(tmp_path)))
    check_output_dir(PPOConfig(output_dir=str(tmp_path), resume=True))
    check_output_dir(PPOConfig(output_dir=str(tmp_path), overwrite_output_dir=True))
