"""``otalign sweep --launcher ray``: two cells as parallel Ray tasks on a local CPU instance give exactly the
sequential launcher's results and are skipped on a rerun; a task holds to the CPUs and GPUs it reserved; without
ray, ``launcher: ray`` is a one-line error.

The Ray test needs ``ray`` (``pip install 'otalign[cluster]'``) and is skipped where it is not installed
(``pytest.importorskip``: CI without the ``cluster`` extra skips it); the other two tests need no ray and run
everywhere."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from test_sweep import write_sweep

from otalign.cli import main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TWO_CELLS = "methods:\n  wpr: {regularizer: wasserstein}\nseeds: [0, 1]\nsave_steps: 3\nanalyses: [coherence]\n"
CELLS = ("wpr,seed=0", "wpr,seed=1")


def test_launcher_ray_without_ray_is_a_one_line_error_before_anything_runs(tmp_path, monkeypatch, capsys):
    config = write_sweep(tmp_path, TWO_CELLS + "launcher: ray\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees without ray: an ImportError
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", config])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "otalign sweep: error: --launcher ray needs ray: pip install 'otalign[cluster]'\n"
    assert not (tmp_path / "out").exists()


def test_a_ray_task_uses_its_reserved_cpus_and_no_gpu_when_it_reserved_none(tmp_path, monkeypatch):
    from otalign.sweep import SweepConfig, launchers, run

    seen = []
    monkeypatch.setattr(run, "run_job", lambda config, job: seen.append((torch.get_num_threads(), os.environ.copy())))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what a Ray worker on a GPU node may inherit
    launchers.run_ray_job(SweepConfig(output_dir=str(tmp_path), launcher="ray", cpus_per_cell=2.5), run.Job(None))
    assert seen[0][0] == 2 and seen[0][1]["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # what Ray sets for a task reserving a GPU
    launchers.run_ray_job(SweepConfig(output_dir=str(tmp_path), cpus_per_cell=0.5, gpus_per_cell=1), run.Job(None))
    assert seen[1][0] == 1 and seen[1][1]["CUDA_VISIBLE_DEVICES"] == "3"


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs, no dashboard (the launcher uses it as it is and leaves it running)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def comparable(cell: dict) -> dict:
    """A cell of ``results.json`` without what depends on the machine's timing."""
    out = {k: v for k, v in cell.items() if not k.endswith("_s") and k != "last_training_metrics"}
    out["last_training_metrics"] = {k: v for k, v in cell["last_training_metrics"].items() if not k.startswith("time/")}
    return out


def test_two_cells_run_in_parallel_as_ray_tasks_with_the_sequential_results_then_are_skipped(
    tmp_path, local_ray, capsys
):
    # 6 steps: each cell trains for seconds, longer than Ray takes to start a task
    config = write_sweep(tmp_path, TWO_CELLS, steps=6)
    expected_out, out = tmp_path / "sequential", tmp_path / "out"
    assert main(["sweep", "--config", config, "--output_dir", str(expected_out)]) == 0
    # the reference is done (same model, same evaluation settings), so the two cells are the only jobs: one CPU
    # each on the 2 CPUs, they start together
    (out / "reference").mkdir(parents=True)
    shutil.copy(expected_out / "reference" / "eval.json", out / "reference" / "eval.json")
    capsys.readouterr()
    assert main(["sweep", "--config", config, "--launcher", "ray"]) == 0
    assert "1 of 3 already done" in capsys.readouterr().out
    # in parallel: each cell started training (cell.json) before the other finished (TRAINED)
    started = {name: (out / name / "cell.json").stat().st_mtime_ns for name in CELLS}
    trained = {name: (out / name / "TRAINED").stat().st_mtime_ns for name in CELLS}
    assert started[CELLS[0]] < trained[CELLS[1]] and started[CELLS[1]] < trained[CELLS[0]], (started, trained)

    results = json.loads((out / "results.json").read_text())
    expected = json.loads((expected_out / "results.json").read_text())
    assert [c["name"] for c in results["cells"]] == list(CELLS) and not results["incomplete"]
    assert [comparable(c) for c in results["cells"]] == [comparable(c) for c in expected["cells"]]
    assert results["settings"] == expected["settings"] and results["analyses"] == expected["analyses"]
    for name in CELLS:
        ray_eval, seq_eval = (json.loads((root / name / "eval.json").read_text()) for root in (out, expected_out))
        assert ray_eval["responses"] == seq_eval["responses"] and ray_eval["kl"] == seq_eval["kl"]

    # a rerun through Ray submits nothing: every job is already done
    stamps = {p: p.stat().st_mtime_ns for name in CELLS for p in (out / name / "TRAINED", out / name / "eval.json")}
    capsys.readouterr()
    assert main(["sweep", "--config", config, "--launcher", "ray"]) == 0
    assert "3 of 3 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
