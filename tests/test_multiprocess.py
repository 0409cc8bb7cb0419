"""Two processes (``accelerate launch --num_processes 2``, CPU, gloo) compute what one process computes.

One launch runs every scenario of ``multiprocess_scenarios.py`` (DPO sigmoid, AOT paired and unpaired, KTO,
SFT, reward model, PPO with the Wasserstein penalty, GRPO with the Wasserstein penalty in the loss and an adaptive
beta, RLOO with the KL in the reward; ``gradient_accumulation_steps=2`` where the trainer has it) with ``b``
examples per process; each test repeats a scenario in this process with ``2b`` examples per step and checks
that the gradient reaching the optimizer at the first step, the parameters after the last step and every
logged metric agree to float tolerance. The data order follows the global sample index, losses are normalised
over the global batch and AOT sorts the gathered batch, so only the floating-point reduction order differs.

Also covered: an epoch's last batch that is incomplete (5 pairs, 4 per step: completed from the next epoch's
order), a dataset with fewer examples than processes (neither process gets an empty share), checkpoints
written by 2 processes and resumed by 2 (bit-identical metrics) and by 1 (equal to float tolerance), and that
only the main process writes to ``output_dir``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multiprocess_scenarios import MAX_STEPS, RESUME_FROM, RESUMED, SCENARIOS, rows, run

from otalign.trainers import read_metrics

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("torch_single_thread")]

WORKER = Path(__file__).parent / "multiprocess_scenarios.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(args: list[str], *, timeout: int = 600) -> None:
    """``accelerate launch --multi_gpu --num_processes 2 <args>`` on CPU (``ACCELERATE_USE_CPU``: gloo, MULTI_CPU);
    fails the test with the launch's output if it fails."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Every scenario run once by 2 processes: ``(root, results per rank)``."""
    root = tmp_path_factory.mktemp("two_processes")
    accelerate_launch([str(WORKER), str(root)])
    return root, [torch.load(root / f"results-{rank}.pt") for rank in (0, 1)]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """``one(name)``: scenario ``name`` run by this process with twice the per-process batch (cached)."""
    root = tmp_path_factory.mktemp("one_process")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = root / name, run(name, root / name, processes=1)
        return cache[name]

    return get


def assert_metrics_close(rows_a: list[dict], rows_b: list[dict]) -> None:
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for a, b in zip(rows_a, rows_b, strict=True):
        assert set(a) == set(b)
        for key, value in b.items():
            if key.startswith("time/") or value is None:
                continue
            if key.startswith("sinkhorn/"):
                # solver diagnostics of a batched solve depend on which positions share a batch: a batch runs
                # until its slowest problem converges, so only "converged" is comparable across process counts
                if key == "sinkhorn/marginal_err":
                    assert a[key] <= 1e-4 and value <= 1e-4, f"step {b['step']}: {key}"
                continue
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"step {b['step']}: {key}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_match_one_process(name, two, one):
    root, results = two
    one_dir, expected = one(name)
    ranks = [r[name] for r in results]
    # data-parallel replicas: the same averaged gradient and the same parameters on both processes
    torch.testing.assert_close(ranks[0]["grads"], ranks[1]["grads"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    assert expected["grads"].abs().max() > 1e-4  # a real gradient, not an all-zero one
    torch.testing.assert_close(ranks[0]["grads"], expected["grads"], rtol=1e-4, atol=1e-7)
    # Adam turns float noise in near-zero gradients into steps of up to lr; 3e-5 is 1% of one step at lr=3e-3
    torch.testing.assert_close(ranks[0]["params"], expected["params"], rtol=1e-4, atol=3e-5)
    two_rows, one_rows = read_metrics(root / name), read_metrics(one_dir)
    assert [r["step"] for r in two_rows][:MAX_STEPS] == list(range(1, MAX_STEPS + 1))  # + final evaluation rows
    assert "loss" in two_rows[0] or "loss/policy" in two_rows[0]
    assert_metrics_close(two_rows, one_rows)


def test_the_uneven_scenarios_are_what_they_claim():
    kind, b, settings = SCENARIOS["dpo_sigmoid"]
    global_batch, n = 2 * b, len(rows(settings["rows"]))
    assert n % global_batch and n < MAX_STEPS * global_batch  # an epoch ends inside a step
    kind, b, settings = SCENARIOS["sft_one_example"]
    assert len(rows(settings["rows"])) < 2 * b  # fewer examples than processes


@pytest.mark.parametrize("name", RESUMED)
def test_checkpoint_of_two_processes_resumes_on_two_and_on_one(name, two, tmp_path, assert_resume_matches):
    """2 -> 2: the same metrics as the uninterrupted 2-process run, exactly; 2 -> 1: to float tolerance (the
    data position, optimizer, scheduler and main-process RNG state are process-count independent)."""
    root, results = two
    resumed_steps = list(range(RESUME_FROM + 1, MAX_STEPS + 1))
    assert_resume_matches(root / name, root / f"{name}_resumed", resumed_steps)
    torch.testing.assert_close(results[0][f"{name}_resumed"]["params"], results[0][name]["params"], rtol=0, atol=0)

    checkpoint = root / name / "checkpoints" / f"checkpoint-{RESUME_FROM}"
    alone = run(name, tmp_path, processes=1, policy_seed=5, resume_from_checkpoint=str(checkpoint))
    full = [r for r in read_metrics(root / name) if r["step"] in resumed_steps]
    assert_metrics_close(read_metrics(tmp_path), full)
    torch.testing.assert_close(alone["params"], results[0][name]["params"], rtol=1e-4, atol=3e-5)


def test_only_the_main_process_writes_to_the_output_dir(two, one):
    root, results = two
    # Python-level writes of rank 1 (audit events): none, except accelerate's exist_ok makedirs of the
    # checkpoint folder that the main process created before the barrier.
    for event, path in results[1]["writes"]:
        assert event == "os.mkdir" and Path(path).name.startswith(".tmp-checkpoint-"), (event, path)
    assert any(path.endswith("metrics.jsonl") for _, path in results[0]["writes"])  # the audit sees writes
    # Files on disk (also catches writes from C++, e.g. torch.save): what one process writes, plus the second
    # process's own RNG state in each checkpoint.
    for name in SCENARIOS:
        one_dir, _ = one(name)
        files_two = {str(p.relative_to(root / name)) for p in (root / name).rglob("*")}
        files_one = {str(p.relative_to(one_dir)) for p in one_dir.rglob("*")}
        extra = {f for f in files_two - files_one if not f.endswith("/random_states_1.pkl")}
        assert not extra and files_one <= files_two, (name, extra, files_one - files_two)
