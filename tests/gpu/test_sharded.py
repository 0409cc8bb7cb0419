"""Device tests: the sharded launch commands of the README on GPUs, against the same run under DDP.

Skipped without CUDA. accelerate 1.15 enables FSDP for GPU-type backends only (``--use_fsdp`` with
``ACCELERATE_USE_CPU=true`` silently runs DDP), so these cannot run in CPU CI. With one GPU the sharded run
has one process (the FSDP2 / ZeRO code paths, a trivial sharding); with two or more, two processes.
Each run: a tiny saved Llama, fp32 (``--mixed_precision no``), 2 steps of ``otalign dpo`` with a small
``max_grad_norm`` so that clipping acts, then the saved model. The metrics must equal the DDP run's
to float tolerance and the saved weights must be the full, trained ones.

Run: ``python -m pytest -q tests/gpu`` (about a minute on one GPU).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_multiprocess import assert_metrics_close, free_port  # noqa: E402

from otalign.models.tiny import save_tiny_model  # noqa: E402
from otalign.trainers import read_metrics  # noqa: E402

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]

EXAMPLES = Path(__file__).parents[2] / "examples" / "accelerate"
PAIRS = str(Path(__file__).parents[1] / "fixtures" / "preference_pairs.jsonl")
PROCESSES = str(min(GPUS, 2))


def launch(tmp_path: Path, config_file: str, name: str, command: str, **settings) -> Path:
    """``accelerate launch --config_file examples/accelerate/<config_file> -m otalign.cli <command> --config`` on
    ``PROCESSES`` GPUs; returns the run's output folder."""
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**settings, "output_dir": str(out)}), encoding="utf-8")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / config_file)]
    cmd += ["--num_processes", PROCESSES, "--mixed_precision", "no", "--main_process_port", str(free_port())]
    cmd += ["-m", "otalign.cli", command, "--config", str(config)]
    done = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return out


def dpo_settings(tmp_path: Path, **overrides) -> dict:
    settings = dict(
        model_name_or_path=save_tiny_model(tmp_path / "tiny"),
        dataset_name=PAIRS,
        eval_dataset_name=PAIRS,
        loss_type="sigmoid",
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        max_grad_norm=0.01,  # clipping acts: a clip of stale (unsharded) parameters would change the run
        progress_bar=False,
        save_model=True,
    )
    return {**settings, **overrides}


def saved_weights(run: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "model").state_dict()


def assert_same_run(sharded: Path, ddp: Path) -> None:
    assert_metrics_close(read_metrics(sharded), read_metrics(ddp))
    ours, theirs = saved_weights(sharded), saved_weights(ddp)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def ddp_dpo(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    return tmp_path, launch(tmp_path, "ddp.yaml", "ddp", "dpo", **dpo_settings(tmp_path))


def test_fsdp_dpo_matches_ddp(ddp_dpo):
    """``accelerate launch --config_file examples/accelerate/fsdp.yaml -m otalign.cli dpo --config dpo.yaml``."""
    tmp_path, ddp = ddp_dpo
    sharded = launch(tmp_path, "fsdp.yaml", "fsdp", "dpo", **dpo_settings(tmp_path, save_steps=2))
    assert_same_run(sharded, ddp)
    assert (sharded / "checkpoints" / "checkpoint-2").is_dir()  # accelerate's sharded save_state


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_dpo_matches_ddp(ddp_dpo, stage):
    """``accelerate launch --config_file examples/accelerate/deepspeed_zero{2,3}.yaml -m otalign.cli dpo``; the
    DeepSpeed configs clip at 1.0 (DeepSpeed ignores the trainer's clipping), so the DDP run here does too."""
    tmp_path, _ = ddp_dpo
    settings = dpo_settings(tmp_path, max_grad_norm=1.0)
    ddp = launch(tmp_path, "ddp.yaml", f"ddp_clip1_{stage}", "dpo", **settings)
    assert_same_run(launch(tmp_path, f"deepspeed_zero{stage}.yaml", f"zero{stage}", "dpo", **settings), ddp)


@pytest.mark.xfail(
    reason="PPO trains two models (policy, critic): accelerate's FSDP2 prepares one; under FSDP1 the rollout "
    "generates with the unwrapped module, whose root parameters stay sharded, and stops per process",
    strict=False,
)
def test_fsdp_ppo_matches_ddp(tmp_path):
    """1 PPO step with the Wasserstein penalty, policy fully sharded (FSDP1: several models per Accelerator)."""
    settings = dict(
        model_name_or_path=save_tiny_model(tmp_path / "tiny"),
        regularizer="wasserstein",
        wpr_top_k=8,
        max_steps=1,
        per_device_train_batch_size=2,
        response_length=6,
        progress_bar=False,
        save_model=False,
    )
    ddp = launch(tmp_path, "ddp.yaml", "ddp", "ppo", **settings)
    fsdp1 = tmp_path / "fsdp1.yaml"
    config = yaml.safe_load((EXAMPLES / "fsdp.yaml").read_text())
    config["fsdp_config"]["fsdp_version"] = 1
    config["fsdp_config"]["fsdp_sharding_strategy"] = "FULL_SHARD"
    fsdp1.write_text(yaml.safe_dump(config))
    sharded = launch(tmp_path, str(fsdp1), "fsdp1", "ppo", **settings)  # absolute path: EXAMPLES / abs = abs
    assert_metrics_close(read_metrics(sharded), read_metrics(ddp))
