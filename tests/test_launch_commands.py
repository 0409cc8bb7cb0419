"""The README's launch commands, run as written on CPU (2 processes, gloo) with a tiny saved model.

``ACCELERATE_USE_CPU=true`` turns accelerate's GPU data-parallel launch into a MULTI_CPU (gloo) one, and
``--mixed_precision no`` keeps the examples' bf16 off the CPU, so the numbers can be compared with one
process over the same global batch. The 2-node command runs as two launchers on this machine, one
process each, meeting at 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_multiprocess import assert_metrics_close, free_port

from otalign.cli import main
from otalign.models.tiny import save_tiny_model
from otalign.trainers import read_metrics

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("torch_single_thread")]

EXAMPLES = Path(__file__).parents[1] / "examples" / "accelerate"
PAIRS = str(Path(__file__).parent / "fixtures" / "preference_pairs.jsonl")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch`
CPU = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def write_config(path: Path, **settings) -> Path:
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def check(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_readme_cpu_ppo_command(tmp_path):
    """``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m otalign.cli ppo --config
    ppo.yaml``: both processes train one policy, and the logged batch is the global one."""
    settings = dict(
        model_name_or_path=str(save_tiny_model(tmp_path / "tiny")),
        regularizer="wasserstein",
        wpr_top_k=8,
        max_steps=2,
        per_device_train_batch_size=2,
        response_length=6,
        learning_rate=1e-3,
        progress_bar=False,
        save_model=False,
    )
    config = write_config(tmp_path / "ppo.yaml", output_dir=str(tmp_path / "two"), **settings)
    cmd = [*LAUNCH, "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    cmd += ["-m", "otalign.cli", "ppo", "--config", str(config)]
    done = subprocess.run(cmd, env=CPU, capture_output=True, text=True, timeout=300)
    check(done)
    assert "2 steps x 4 rollouts" in done.stdout and "processes=2" in done.stdout
    main(["ppo", "--config", str(config), "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size=4"])
    assert_metrics_close(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"))


def dpo_config(tmp_path: Path, per_device: int) -> Path:
    settings = dict(
        model_name_or_path=str(save_tiny_model(tmp_path / "tiny")),
        dataset_name=PAIRS,
        loss_type="aot_unpaired",
        max_steps=2,
        learning_rate=3e-3,
        per_device_train_batch_size=per_device,
        progress_bar=False,
        save_model=False,
    )
    return write_config(tmp_path / f"dpo{per_device}.yaml", **settings)


def test_readme_two_node_command_on_one_machine(tmp_path):
    """``accelerate launch --config_file examples/accelerate/multi_node.yaml --machine_rank R --main_process_ip
    ADDR -m otalign.cli dpo --config dpo.yaml`` on 2 "machines" of 1 process each equals 1 process."""
    config, port = dpo_config(tmp_path, 2), str(free_port())
    cmd = [*LAUNCH, "--config_file", str(EXAMPLES / "multi_node.yaml"), "--num_processes", "2"]
    cmd += ["--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    run = ["-m", "otalign.cli", "dpo", "--config", str(config), "--output_dir", str(tmp_path / "two")]
    nodes = [
        subprocess.Popen(
            [*cmd, "--machine_rank", str(rank), *run], env=CPU, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        out, err = node.communicate(timeout=300)
        check(subprocess.CompletedProcess(node.args, node.returncode, out.decode(), err.decode()))
    main(["dpo", "--config", str(dpo_config(tmp_path, 4)), "--output_dir", str(tmp_path / "one")])
    assert_metrics_close(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"))
