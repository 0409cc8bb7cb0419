"""The TRL example scripts (examples/trl/grpo.py, dpo.py) run as TRL users run TRL's own scripts: a subprocess with
TRL's flags plus otalign's, 2 steps on a tiny random model and a local dataset (nothing downloaded); the saved
weights differ from the initial ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from otalign.models.tiny import save_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max_steps", "2", "--learning_rate", "1e-2", "--use_cpu", "--report_to", "none", "--save_strategy", "no"]
COMMON += ["--logging_steps", "1", "--bf16", "false", "--seed", "0"]


def write_jsonl(folder: Path, rows: list[dict]) -> str:
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


def run(script: str, tmp_path: Path, args: list[str]) -> dict[str, torch.Tensor]:
    """Run ``examples/trl/<script>`` in ``tmp_path`` and return how far each saved weight moved from the start."""
    from safetensors.torch import load_file

    model = save_tiny_model(tmp_path / "model")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(ROOT / "examples" / "trl" / script), "--model_name_or_path", model]
    command += ["--output_dir", str(tmp_path / "out"), *COMMON, *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    before, after = load_file(Path(model) / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    return {name: (after[name] - before[name]).abs().max() for name in before}


@pytest.mark.parametrize("penalty_in", ["loss", "reward"])
def test_grpo_example_trains_two_steps(tmp_path, penalty_in):
    prompts = write_jsonl(tmp_path / "prompts", [{"prompt": p} for p in ["the cat", "a dog is", "we are", "it was"]])
    reward = "def length(completions, **kwargs):\n    return [len(c) / 10 for c in completions]\n"
    (tmp_path / "rewards.py").write_text(reward)
    moved = run(
        "grpo.py",
        tmp_path,
        ["--dataset_name", prompts, "--reward_funcs", "rewards.length", "--beta", "0.2", "--num_generations", "4"]
        + ["--per_device_train_batch_size", "4", "--max_completion_length", "6", "--regularizer", "wasserstein"]
        + ["--penalty_in", penalty_in, "--wpr_top_k", "4"],
    )
    assert float(moved["lm_head.weight"]) > 0


def test_dpo_example_trains_two_steps(tmp_path):
    pairs = [
        {"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran"},
        {"prompt": "a dog", "chosen": " is here", "rejected": " was not there"},
    ]
    data = write_jsonl(tmp_path / "pairs", pairs)
    moved = run(
        "dpo.py",
        tmp_path,
        ["--dataset_name", data, "--beta", "0.1", "--per_device_train_batch_size", "2", "--otpo_eps1", "1.0"],
    )
    assert float(moved["lm_head.weight"]) > 0
