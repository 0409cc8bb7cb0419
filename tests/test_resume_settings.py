"""``--resume`` keeps the schedule, optimizer and batch shape of the run it continues, or stops in one line naming
what changed; it cannot be combined with ``--overwrite_output_dir``."""

from __future__ import annotations

import json
import shutil

import pytest
from test_preference_trainer import PAIRS

from otalign.config import ConfigError
from otalign.trainers import PreferenceConfig, PreferenceTrainer, read_metrics


@pytest.fixture
def make_trainer(trainer_factory):
    return trainer_factory(
        PreferenceTrainer,
        PreferenceConfig,
        dataset_name=PAIRS,
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_total_limit=None,
    )


@pytest.fixture
def first_run(make_trainer, tmp_path):
    """A 4-step run whose last checkpoint is gone (as if killed after step 2's): ``--resume`` starts at step 3."""
    make_trainer(tmp_path).train()
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")
    return tmp_path


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"max_steps": 6}, "max_steps 4 -> 6"),
        ({"learning_rate": 5e-4}, "learning_rate 0.001 -> 0.0005"),
        ({"per_device_train_batch_size": 4, "lr_scheduler_type": "cosine"}, "lr_scheduler_type 'linear' -> 'cosine'"),
    ],
)
def test_a_resume_that_changes_the_schedule_or_batch_stops_naming_the_fields(first_run, make_trainer, changed, named):
    rows = read_metrics(first_run)
    with pytest.raises(ValueError, match=r"^cannot resume from .*checkpoint-2: .*since it was written") as info:
        make_trainer(first_run, resume=True, **changed).train()
    message = str(info.value)
    assert named in message and "\n" not in message
    if "per_device_train_batch_size" in changed:
        assert "examples_per_step 2 -> 4" in message
    assert read_metrics(first_run) == rows  # nothing trained, nothing rewritten
    assert json.loads((first_run / "config.json").read_text())["max_steps"] == 4


def test_a_resume_with_the_same_settings_and_other_logging_continues(first_run, make_trainer):
    # the same examples per step, split into more micro-batches (or, alike, over more processes): allowed
    make_trainer(
        first_run,
        resume=True,
        logging_steps=2,
        save_steps=1,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
    ).train()
    assert [row["step"] for row in read_metrics(first_run)] == [1, 2, 4]


def test_the_command_line_reports_the_change_in_one_line(first_run, capsys):
    from otalign.cli import main
    from otalign.models.tiny import save_tiny_model

    model = save_tiny_model(first_run.parent / "tiny-model")
    argv = ["dpo", "--output_dir", str(first_run), "--resume", "--model_name_or_path", str(model)]
    argv += ["--dataset_name", str(PAIRS), "--max_steps", "5", "--per_device_train_batch_size", "2"]
    argv += ["--learning_rate", "1e-3", "--save_steps", "2", "--progress_bar", "false"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("otalign dpo: error: cannot resume from") and "max_steps 4 -> 5" in line


@pytest.mark.parametrize("resume", [{"resume": True}, {"resume_from_checkpoint": "runs/x/checkpoints/checkpoint-2"}])
def test_resume_and_overwrite_output_dir_contradict(resume):
    name = next(iter(resume))
    with pytest.raises(ConfigError, match=rf"^{name} continues the run in output_dir, overwrite_output_dir starts"):
        PreferenceConfig(overwrite_output_dir=True, **resume)


def test_a_resume_that_trains_no_step_only_loads_the_state(first_run, make_trainer):
    trainer = make_trainer(first_run, resume=True, max_steps=2, learning_rate=1e-6)
    trainer.train()
    assert trainer.state.global_step == 2
