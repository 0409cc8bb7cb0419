"""``otalign sweep`` on tiny random models: grid expansion and cell names, the one-line errors of a malformed sweep
file, a whole PPO sweep (evaluation, aggregate, plots), skipping finished cells, resuming a killed cell, rebuilding
the aggregate from the folders alone, a DPO sweep, and the interval arithmetic against scipy."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_eval_run import save_tiny_models, tiny_prompts

from otalign.cli import main
from otalign.sweep import Job, SweepConfig, expand_grid, parse_sweep_config
from otalign.sweep.aggregate import seed_interval, t_quantile_975
from otalign.trainers import ConfigError, read_metrics

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def write_sweep(tmp_path, body: str, *, steps: int = 2, name: str = "sweep.yaml") -> str:
    """A PPO sweep file on a tiny model and prompt file, with ``body`` appended (methods, grid, seeds, ...; its
    ``analyses`` replaces the default two)."""
    (model,) = save_tiny_models(tmp_path, seeds=(0,))
    prompts = tiny_prompts(tmp_path)
    path = tmp_path / name
    path.write_text(
        f"command: ppo\noutput_dir: {tmp_path / 'out'}\n"
        f"base:\n  model_name_or_path: {model}\n  prompts: {prompts}\n  max_steps: {steps}\n"
        "  per_device_train_batch_size: 2\n  response_length: 4\n  learning_rate: 0.03\n  wpr_top_k: 8\n"
        f"  wpr_max_iter: 50\neval_prompts: {prompts}\neval_w_top_k: 8\neval_w_max_iter: 50\n"
        + ("" if re.search(r"^analyses:", body, flags=re.M) else "analyses: [penalty_correlation, coherence]\n")
        + body
    )
    return str(path)


TWO_METHODS = (
    "methods:\n  wpr: {regularizer: wasserstein, grid: {beta: [0.01, 0.1]}}\n"
    "  rkl: {regularizer: rkl, grid: {beta: [0.01]}}\nseeds: [0, 1]\n"
)


def test_grid_expands_methods_x_settings_x_seeds_with_readable_names():
    config = SweepConfig(
        base={"max_steps": 8},
        methods={"wpr": {"regularizer": "wasserstein", "grid": {"beta": [0.05, 0.1]}}, "rkl": {"regularizer": "rkl"}},
        grid={"learning_rate": [1e-4, "3e-4"]},
        seeds=[0, 2],
    )
    cells = expand_grid(config)
    assert len(cells) == 2 * 2 * 2 + 1 * 2 * 2
    assert [c.name for c in cells[:4]] == [
        "wpr,learning_rate=0.0001,beta=0.05,seed=0",
        "wpr,learning_rate=0.0001,beta=0.05,seed=2",
        "wpr,learning_rate=0.0001,beta=0.1,seed=0",
        "wpr,learning_rate=0.0001,beta=0.1,seed=2",
    ]
    assert cells[-1].name == "rkl,learning_rate=0.0003,seed=2" and cells[-1].setting_name == "rkl,learning_rate=0.0003"
    assert cells[0].overrides == {"regularizer": "wasserstein", "learning_rate": 1e-4, "beta": 0.05, "seed": 0}
    assert [c.name for c in expand_grid(config)] == [c.name for c in cells]  # deterministic
    ppo = config.cell_config(cells[0])
    assert (ppo.regularizer, ppo.beta, ppo.seed, ppo.max_steps) == ("wasserstein", 0.05, 0, 8)
    assert ppo.output_dir.endswith("/wpr,learning_rate=0.0001,beta=0.05,seed=0")
    assert ppo.resume and ppo.save_model and ppo.save_steps == 2 and not ppo.progress_bar
    # what a launcher running cells elsewhere (Ray, a cluster) ships: the config and a job, both picklable
    ray_config = dataclasses.replace(config, launcher="ray", cpus_per_cell=2, gpus_per_cell=0.5)  # no ray needed
    config_copy, job = pickle.loads(pickle.dumps((ray_config, Job(cells[0]))))
    assert job.name == cells[0].name and config_copy.cell_config(job.cell) == ppo
    assert (config_copy.launcher, config_copy.cpus_per_cell, config_copy.gpus_per_cell) == ("ray", 2, 0.5)
    default = expand_grid(SweepConfig(command="dpo", grid={"loss_type": ["sigmoid", "ipo"]}))
    assert [c.name for c in default] == ["dpo,loss_type=sigmoid,seed=0", "dpo,loss_type=ipo,seed=0"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("seed: [0]\n", "sweep.yaml: unknown option 'seed'; did you mean seeds"),
        ("command: grpo_x\n", "command: unknown trainer 'grpo_x'"),
        ("base: {max_step: 3}\n", "base: unknown option 'max_step'; did you mean max_steps"),
        ("grid: {beta: 0.1}\n", "grid.beta: expected a non-empty list of values, got 0.1"),
        ("grid: {beta: [0.1, high]}\n", "grid.beta[1]: expected a number, got 'high'"),
        ("methods: {wpr: {regularizer: wasserstein, grid: {btea: [1]}}}\n", "methods.wpr.grid: unknown option 'btea'"),
        ("methods: {wpr: {max_steps: many}}\n", "methods.wpr.max_steps: expected an integer, got 'many'"),
        ("methods: {wpr: {seed: 3}}\n", "methods.wpr.seed: set by the sweep for every cell"),
        ("seeds: []\n", "seeds: give at least one seed"),
        ("analyses: [bert_score]\n", "analyses: unknown analysis 'bert_score'"),
        ("methods: {wpr: {regularizer: wasserstien}}\n", "cell wpr,seed=0: unknown regularizer 'wasserstien'"),
        ("launcher: slurm\n", "unknown launcher 'slurm'; choose one of ['sequential', 'ray']"),
    ],
)
def test_a_malformed_sweep_file_is_a_one_line_error_naming_the_field(tmp_path, capsys, body, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\n{body}")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err
    assert err.startswith(f"otalign sweep: error: {path}: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing ran


def test_ppo_sweep_evaluates_every_cell_alike_then_skips_finished_work_and_rebuilds_from_folders(tmp_path, capsys):
    config = write_sweep(tmp_path, TWO_METHODS)
    assert main(["sweep", "--config", config]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    names = [c["name"] for c in results["cells"]]
    assert names == [
        "wpr,beta=0.01,seed=0",
        "wpr,beta=0.01,seed=1",
        "wpr,beta=0.1,seed=0",
        "wpr,beta=0.1,seed=1",
        "rkl,beta=0.01,seed=0",
        "rkl,beta=0.01,seed=1",
    ]
    assert not results["incomplete"] and not results["stale"] and not results["outside_grid"]
    for name in names:
        assert [r["step"] for r in read_metrics(out / name)] == [1, 2]
        assert not (out / name / "checkpoints").exists()  # removed once the model was saved
    # one evaluation protocol: same prompts, same W solver settings, recorded once for all
    settings = results["eval_settings"]
    assert settings["wasserstein"]["top_k"] == 8 and settings["wasserstein"]["max_iter"] == 50
    evals = [json.loads((out / n / "eval.json").read_text()) for n in names + ["reference"]]
    assert all(e["settings"] == settings for e in evals)
    reference = results["reference"]
    assert reference["kl_per_token"] == 0.0 and reference["w_per_token"] == pytest.approx(0, abs=1e-6)
    ref_scores = evals[-1]["scores"]
    for cell, e in zip(results["cells"], evals, strict=False):
        assert cell["kl_per_token"] > 0 and cell["w_per_token"] > 0
        expected = np.mean([float(a > b) + 0.5 * float(a == b) for a, b in zip(e["scores"], ref_scores, strict=True)])
        assert cell["win_rate"] == pytest.approx(expected)
    # per setting: across-seed t-interval of the two seeds' values
    wpr = next(s for s in results["settings"] if s["name"] == "wpr,beta=0.1")
    rewards = [c["reward"] for c in results["cells"] if c["name"].startswith("wpr,beta=0.1,")]
    assert wpr["across_seeds"]["reward"]["mean"] == pytest.approx(np.mean(rewards))
    half = stats.t.ppf(0.975, 1) * np.std(rewards, ddof=1) / math.sqrt(2)
    assert wpr["across_seeds"]["reward"]["ci95"] == pytest.approx(half, rel=1e-3)
    pair = results["head_to_head"]["pairs"][0]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("wpr", "rkl", [0, 1]) and 0 <= pair["win_rate_a"]["mean"] <= 1
    analyses = results["analyses"]
    assert set(analyses) == {"penalty_correlation", "coherence"}
    assert "pearson_r" in analyses["penalty_correlation"]["wpr,beta=0.1,seed=0"]["training"]
    assert "skipped" in analyses["penalty_correlation"]["rkl,beta=0.01,seed=0"]["training"]  # no W logged
    assert analyses["coherence"]["settings"]["rkl,beta=0.01"]["mean"] > 0
    for png in ("frontier.png", "head_to_head.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun trains and evaluates nothing
    stamps = {p: p.stat().st_mtime_ns for n in names for p in (out / n / "TRAINED", out / n / "eval.json")}
    capsys.readouterr()
    assert main(["sweep", "--config", config]) == 0
    assert "7 of 7 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # the aggregate from the folders alone is the same, even with the models gone
    for name in names:
        for path in sorted((out / name / "model").iterdir()):
            path.unlink()
    for produced in ("results.json", "frontier.png", "head_to_head.png"):
        (out / produced).unlink()
    assert main(["sweep", "--config", config, "--aggregate-only"]) == 0
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "frontier.png").is_file()

    # a smaller grid aggregates only its own cells and names the rest
    smaller = Path(config).read_text().replace("beta: [0.01, 0.1]", "beta: [0.1]")
    Path(config).write_text(smaller.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    assert main(["sweep", "--config", config, "--aggregate-only"]) == 0
    partial = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in partial["cells"]] == [n for n in names if "beta=0.01" not in n or "rkl" in n]
    assert partial["outside_grid"] == ["wpr,beta=0.01,seed=0", "wpr,beta=0.01,seed=1"]
    assert partial["incomplete"] == ["rkl,beta=0.01,seed=2", "wpr,beta=0.1,seed=2"]


def test_a_killed_cell_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys, assert_resume_matches):
    from otalign.trainers.base import BaseTrainer

    body = "methods:\n  wpr: {regularizer: wasserstein}\nseeds: [0]\nsave_steps: 1\nanalyses: []\n"
    full = write_sweep(tmp_path / "full", body, steps=4)
    assert main(["sweep", "--config", full]) == 0
    config = write_sweep(tmp_path / "killed", body, steps=4)
    original = BaseTrainer.end_step

    def end_step_then_die(self, step, metrics):
        original(self, step, metrics)
        if step == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(BaseTrainer, "end_step", end_step_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(["sweep", "--config", config])
    cell = tmp_path / "killed" / "out" / "wpr,seed=0"
    assert (cell / "checkpoints" / "checkpoint-2").is_dir() and not (cell / "TRAINED").exists()
    monkeypatch.setattr(BaseTrainer, "end_step", original)
    capsys.readouterr()
    assert main(["sweep", "--config", config]) == 0
    assert f"resumed from {cell / 'checkpoints' / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert_resume_matches(tmp_path / "full" / "out" / "wpr,seed=0", cell, range(1, 5))
    killed = json.loads((tmp_path / "killed" / "out" / "results.json").read_text())
    uninterrupted = json.loads((tmp_path / "full" / "out" / "results.json").read_text())
    assert killed["cells"][0]["reward"] == uninterrupted["cells"][0]["reward"]
    assert killed["cells"][0]["kl_per_token"] == pytest.approx(uninterrupted["cells"][0]["kl_per_token"], rel=1e-5)


def test_changed_evaluation_settings_redo_the_evaluations_but_not_the_training(tmp_path, capsys):
    config = write_sweep(tmp_path, "methods:\n  rkl: {regularizer: rkl}\nanalyses: []\n")
    assert main(["sweep", "--config", config]) == 0
    trained = tmp_path / "out" / "rkl,seed=0" / "TRAINED"
    stamp = trained.stat().st_mtime_ns
    assert main(["sweep", "--config", config, "--eval_max_new_tokens", "3"]) == 0
    assert trained.stat().st_mtime_ns == stamp
    evaluation = json.loads((tmp_path / "out" / "rkl,seed=0" / "eval.json").read_text())
    assert evaluation["settings"]["max_new_tokens"] == 3 and max(evaluation["lengths"]) <= 3


def test_a_cell_started_with_other_settings_is_an_error_not_a_silent_skip(tmp_path, capsys):
    config = write_sweep(tmp_path, "methods:\n  rkl: {regularizer: rkl}\nanalyses: []\n")
    assert main(["sweep", "--config", config]) == 0
    Path(config).write_text(Path(config).read_text().replace("max_steps: 2", "max_steps: 3"))
    with pytest.raises(SystemExit):
        main(["sweep", "--config", config])
    assert "cell rkl,seed=0 was started with max_steps=2, the sweep now sets 3" in capsys.readouterr().err


def test_a_field_added_to_otalign_since_a_cell_started_counts_as_unchanged_at_its_default(tmp_path, capsys):
    config = write_sweep(tmp_path, "methods:\n  rkl: {regularizer: rkl}\nanalyses: []\n")
    assert main(["sweep", "--config", config]) == 0
    started = tmp_path / "out" / "rkl,seed=0" / "config.json"
    old = json.loads(started.read_text())
    del old["on_nonfinite"]  # as written by an otalign without that field
    started.write_text(json.dumps(old))
    assert main(["sweep", "--config", config]) == 0  # default value: the same training
    Path(config).write_text(Path(config).read_text().replace("max_steps: 2", "max_steps: 2\n  on_nonfinite: skip"))
    with pytest.raises(SystemExit):
        main(["sweep", "--config", config])
    assert "cell rkl,seed=0 was started with on_nonfinite=None, the sweep now sets 'skip'" in capsys.readouterr().err


def test_dpo_sweep_over_loss_types(tmp_path):
    from test_preference_trainer import PAIRS

    (model,) = save_tiny_models(tmp_path, seeds=(0,))
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"command: dpo\noutput_dir: {tmp_path / 'out'}\n"
        f"base: {{model_name_or_path: {model}, dataset_name: {PAIRS}, eval_dataset_name: {PAIRS}, max_steps: 2, "
        "per_device_train_batch_size: 4, learning_rate: 0.01}\nmethods:\n  dpo: {loss_type: sigmoid}\n"
        "  otpo: {loss_type: sigmoid, token_weighting: otpo}\n"
        f"  aot: {{loss_type: aot_paired}}\neval_prompts: {tiny_prompts(tmp_path)}\neval_max_new_tokens: 4\n"
        "eval_w_top_k: 8\neval_w_max_iter: 50\nanalyses: [coherence]\n"
    )
    assert main(["sweep", "--config", str(config)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [c["name"] for c in results["cells"]] == ["dpo,seed=0", "otpo,seed=0", "aot,seed=0"]
    assert results["eval_settings"]["reward_fn"] == "sentiment"  # dpo has no reward: the default judge
    assert all(c["kl_per_token"] > 0 for c in results["cells"])
    assert len(results["head_to_head"]["pairs"]) == 3
    for setting in results["settings"]:  # the trainer's own evaluation, under TRL's eval_ names
        assert 0 <= setting["across_seeds"]["eval_rewards/accuracies"]["mean"] <= 1


def test_t_quantile_and_seed_interval_match_scipy():
    for df in (1, 2, 5, 10, 11, 20, 50, 200):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4)
    values = [0.2, 0.35, 0.3, 0.1]
    interval = seed_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert interval["ci95"] == pytest.approx((high - low) / 2, rel=1e-3)
    assert seed_interval([0.4])["ci95"] is None and seed_interval([0.4])["mean"] == 0.4


def test_aggregate_only_before_any_run_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--output_dir", str(tmp_path / "nothing"), "--aggregate-only"])
    err = capsys.readouterr().err
    assert err.startswith("otalign sweep: error: output_dir: ") and err.endswith("(run the sweep first)\n")


def test_parse_sweep_config_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"^sweep config: --num_eval_prompts: expected an integer"):
        parse_sweep_config(None, ["--num_eval_prompts", "many"])
