"""A real run killed with ``SIGKILL`` at any moment loses nothing: ``--resume`` ends with the metrics of an
uninterrupted run.

Each killed run is ``otalign <command>`` in its own process, with one function wrapped so that the process
sends itself ``SIGKILL`` at an exact point: in the middle of a step (inside the backward pass of step 3), in the
middle of writing checkpoint 2 (after the first file of the state is on disk), or in the middle of writing a
metrics line (half of the line of step 3 flushed). The resumed run is a fresh ``otalign <command> --resume``
process. Its ``metrics.jsonl`` must equal the uninterrupted run's in every non-timing value, and a half-written
checkpoint must never be what it resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from otalign.trainers import list_checkpoints, read_metrics
from otalign.trainers.checkpoint import verify_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MAX_STEPS = 4

# point -> the code that arms it in the killed process (``kill()`` sends SIGKILL to the process itself)
KILL_POINTS = {
    "during a step": """
        import accelerate
        calls = {"n": 0}
        backward = accelerate.Accelerator.backward
        def armed(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # step 3's backward: steps 1-2 logged, checkpoint 2 complete
                kill()
            return backward(self, *args, **kwargs)
        accelerate.Accelerator.backward = armed
    """,
    "during a checkpoint write": """
        import torch
        calls = {"armed": False}
        save = torch.save
        import otalign.trainers.checkpoint as checkpoint
        manager_save = checkpoint.CheckpointManager.save
        def saving(self, step):
            calls["armed"] = step == 2
            return manager_save(self, step)
        def armed(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            if calls["armed"]:  # one file of checkpoint 2 on disk, the rest not
                kill()
        checkpoint.CheckpointManager.save = saving
        torch.save = armed
    """,
    "disk full during a checkpoint write": """
        import errno
        import torch
        calls = {"armed": False, "saved": 0}
        save = torch.save
        import otalign.trainers.checkpoint as checkpoint
        manager_save = checkpoint.CheckpointManager.save
        def saving(self, step):
            calls["armed"] = step == 2
            return manager_save(self, step)
        def armed(obj, f, *args, **kwargs):
            if calls["armed"] and calls["saved"] >= 1:  # one file of checkpoint 2 on disk, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            calls["saved"] += calls["armed"]
            return save(obj, f, *args, **kwargs)
        checkpoint.CheckpointManager.save = saving
        torch.save = armed
    """,
    "during a metrics write": """
        import json
        import otalign.trainers.metrics as metrics
        log = metrics.MetricsLogger.log
        def armed(self, values, step):
            if step == 3:
                line = json.dumps({"step": step, **values})
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(line[: len(line) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                kill()
            return log(self, values, step)
        metrics.MetricsLogger.log = armed
    """,
}

LAUNCH = """
import os, signal, sys
def kill():
    os.kill(os.getpid(), signal.SIGKILL)
{arm}
from otalign.cli import main
sys.exit(main(sys.argv[1:]))
"""


def otalign(args: list[str], arm: str = "") -> subprocess.CompletedProcess:
    """``otalign <args>`` in a fresh Python process, with ``arm`` (a kill point) run first."""
    script = LAUNCH.format(arm=textwrap.dedent(arm))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sft_args(tmp_path_factory):
    """``args(output_dir)``: a 4-step SFT run on a saved tiny model, checkpoint every 2 steps."""
    from otalign.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")

    def args(output_dir) -> list[str]:
        return [
            "sft",
            "--model_name_or_path",
            str(model),
            "--dataset_name",
            os.path.join(FIXTURES, "sft_pairs.jsonl"),
            "--output_dir",
            str(output_dir),
            "--max_steps",
            str(MAX_STEPS),
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "1e-3",
            "--save_steps",
            "2",
            "--save_model",
            "false",
            "--progress_bar",
            "false",
        ]

    return args


@pytest.fixture(scope="module")
def uninterrupted_run(sft_args, tmp_path_factory):
    """The output folder of the uninterrupted run (checkpoints 2 and 4)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    done = otalign(sft_args(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return read_metrics(uninterrupted_run)


def non_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_metrics(point, sft_args, uninterrupted, tmp_path):
    killed = otalign(sft_args(tmp_path), KILL_POINTS[point])
    if point.startswith("disk full"):  # one line naming the checkpoint and the space; no temporary folder left
        assert killed.returncode == 2, killed.stderr[-3000:]
        line = killed.stderr.strip().splitlines()[-1]
        assert line.startswith("otalign sft: error: no space left to write checkpoint "), line
        assert "checkpoint-2" in line and "MiB free" in line and "needs more than" in line, line
        assert not (tmp_path / "checkpoints" / ".tmp-checkpoint-2").exists()
    else:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path)] in (["checkpoint-2"], [])  # never a half-written one
    if point == "during a checkpoint write":
        assert list_checkpoints(tmp_path) == [] and (tmp_path / "checkpoints" / ".tmp-checkpoint-2").is_dir()
    if point == "during a metrics write":
        last = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1]
        assert last.startswith('{"step": 3') and not last.endswith("}")  # the torn line is there

    resumed = otalign([*sft_args(tmp_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert non_timing(read_metrics(tmp_path)) == non_timing(uninterrupted)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "checkpoints" / ".tmp-checkpoint-2").exists()


def test_every_checkpoint_file_is_verified(uninterrupted_run, tmp_path):
    """Each file of a checkpoint, truncated to half or to nothing, or removed, is named; an intact one passes."""
    source = list_checkpoints(uninterrupted_run)[-1]
    assert verify_checkpoint(source) is None
    names = sorted(p.name for p in source.iterdir() if p.name != "manifest.json")
    assert {"optimizer.bin", "pytorch_model.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= set(names)
    for name in names:
        for damage in ("half", "empty", "removed", "flipped"):
            copy = tmp_path / f"{name}-{damage}"
            shutil.copytree(source, copy)
            file = copy / name
            data = file.read_bytes()
            if damage == "removed":
                file.unlink()
            else:
                cut = {"half": data[: len(data) // 2], "empty": b""}.get(damage, bytes([data[0] ^ 1]) + data[1:])
                file.write_bytes(cut)
            why = verify_checkpoint(copy)
            assert why is not None and why.startswith(name), (name, damage, why)


def test_resume_skips_a_truncated_checkpoint(sft_args, uninterrupted_run, uninterrupted, tmp_path):
    """A truncated file in the newest checkpoint: one line names it, the run resumes from the previous checkpoint
    and ends with the uninterrupted run's metrics; an explicit ``--resume_from_checkpoint`` of it stops in one
    line."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run)
    broken = run / "checkpoints" / "checkpoint-4"
    optimizer = broken / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    explicit = otalign([*sft_args(run), "--resume_from_checkpoint", str(broken)])
    assert explicit.returncode == 2, explicit.stderr[-3000:]
    line = explicit.stderr.strip().splitlines()[-1]
    assert line == f"otalign sft: error: checkpoint {broken} is broken: optimizer.bin has 100 bytes, " + (
        f"{verify_manifest_bytes(broken, 'optimizer.bin')} were written"
    ), line
    resumed = otalign([*sft_args(run), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint {broken} is broken: optimizer.bin has 100 bytes" in resumed.stderr
    assert "resuming from checkpoint-2" in resumed.stderr
    assert non_timing(read_metrics(run)) == non_timing(uninterrupted)
    assert verify_checkpoint(broken) is None  # rewritten whole at step 4


def verify_manifest_bytes(checkpoint, name: str) -> int:
    return json.loads((checkpoint / "manifest.json").read_text())["files"][name]["bytes"]


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="mounts a small tmpfs in a private mount namespace: Linux, root, util-linux unshare",
)
def test_a_really_full_disk_stops_in_one_line_and_leaves_no_temporary_folder(sft_args, tmp_path):
    """The run's output folder is a 200 KiB tmpfs (a checkpoint needs ~320 KiB): torch's own error on the full disk
    (``unexpected pos ...``) becomes one line naming the checkpoint and the space; nothing temporary is left."""
    out = tmp_path / "full"
    out.mkdir()
    script = LAUNCH.format(arm="")
    shell = 'mount -t tmpfs -o size=200k tmpfs "$1" || exit 99; shift; "$@"; echo "exit=$?"; ls -A "$0/checkpoints"'
    command = ["unshare", "-m", "--propagation", "private", "sh", "-c", shell, str(out), str(out)]
    done = subprocess.run(
        [*command, sys.executable, "-c", script, *sft_args(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if "exit=" not in done.stdout:
        pytest.skip(f"no private tmpfs here: {done.stderr[-500:]}")
    errors = [line for line in done.stderr.splitlines() if line.startswith("otalign sft:")]
    assert len(errors) == 1 and "exit=2" in done.stdout, done.stderr[-3000:]
    assert errors[0].startswith(
        f"otalign sft: error: no space left to write checkpoint {out}/checkpoints/checkpoint-2:"
    )
    assert "MiB free on its disk, a checkpoint needs more than" in errors[0]
    assert done.stdout.split("exit=2", 1)[1].strip() == ""  # checkpoints/ is empty: the partial write was removed


def test_a_lora_run_checkpoints_only_what_trains_and_resumes_exactly(sft_args, uninterrupted_run, tmp_path):
    """With LoRA the checkpoint's model file holds the adapters only (the frozen base weights are the pretrained
    ones, loaded again on resume); a run killed mid-step resumes to the uninterrupted LoRA run's metrics."""
    import torch

    lora = ["--use_peft", "true", "--lora_r", "2"]
    whole = otalign([*sft_args(tmp_path / "whole"), *lora])
    assert whole.returncode == 0, whole.stderr[-3000:]
    checkpoint = list_checkpoints(tmp_path / "whole")[-1]
    keys = list(torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True))
    assert keys and all(".lora_" in k for k in keys), keys[:5]
    full = (list_checkpoints(uninterrupted_run)[-1] / "pytorch_model.bin").stat().st_size
    assert (checkpoint / "pytorch_model.bin").stat().st_size < full / 2  # the tiny model: 32 KB against 100 KB
    assert json.loads((checkpoint / "manifest.json").read_text())["trainable_only"] == [0]

    killed = otalign([*sft_args(tmp_path / "killed"), *lora], KILL_POINTS["during a step"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = otalign([*sft_args(tmp_path / "killed"), *lora, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert non_timing(read_metrics(tmp_path / "killed")) == non_timing(read_metrics(tmp_path / "whole"))


def test_lora_checkpoints_resume_grpo_exactly_and_refuse_other_base_weights(tmp_path, assert_resume_matches):
    """GRPO with LoRA: resuming from an adapter-only checkpoint gives the uninterrupted metrics; resuming it into a
    policy with other base weights (another seed) stops in one line instead of silently mixing them."""
    from test_critic_free import make

    from otalign.trainers.checkpoint import CheckpointError

    settings = dict(max_steps=4, save_steps=2, use_peft=True, lora_r=2)
    make(tmp_path / "full", save_total_limit=None, **settings).train()
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-2"
    assert json.loads((checkpoint / "manifest.json").read_text())["trainable_only"] == [0]
    make(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **settings).train()
    assert_resume_matches(tmp_path / "full", tmp_path / "resumed", [3, 4])
    with pytest.raises(CheckpointError, match="holds LoRA adapters trained on other base weights than this model's"):
        make(tmp_path / "other", policy_seed=5, resume_from_checkpoint=str(checkpoint), **settings).train()
