"""The analyses: penalty correlation (from a run's metrics and recomputed on tiny generations) and candidate
coherence write their JSON and PNG; correlation and slope agree with scipy on the same arrays."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy import stats
from test_eval_run import save_tiny_models, tiny_prompts

from otalign.cli import main
from otalign.eval.analysis import PenaltyCorrelationConfig, candidate_spread, correlate
from otalign.trainers import ConfigError

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_correlate_matches_scipy_on_jointly_normalised_arrays():
    rng = np.random.default_rng(0)
    kl = rng.gamma(2.0, 1.0, 300)
    w = 0.4 * kl + rng.normal(0, 0.2, 300) + 1.0
    result = correlate(kl, w, beta_kl=0.05, beta_wasserstein=0.1)
    x, y = np.array(result["kl"]), np.array(result["wasserstein"])
    assert min(x.min(), y.min()) == 0.0 and max(x.max(), y.max()) == pytest.approx(1.0)  # one shared range
    lo, hi = result["range"]
    np.testing.assert_allclose(x * (hi - lo) + lo, 0.05 * kl)
    np.testing.assert_allclose(y * (hi - lo) + lo, 0.1 * w)
    fit = stats.linregress(x, y)
    assert result["pearson_r"] == pytest.approx(stats.pearsonr(kl, w).statistic)
    assert result["slope"] == pytest.approx(fit.slope) and result["intercept"] == pytest.approx(fit.intercept)


def test_correlate_hand_case_and_bad_input():
    result = correlate([0.0, 1.0, 2.0, 4.0], [0.0, 0.5, 1.0, 2.0])  # W = KL / 2; shared range [0, 4]
    assert result["pearson_r"] == pytest.approx(1.0) and result["slope"] == pytest.approx(0.5)
    assert result["kl"] == [0.0, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="constant"):
        correlate([1.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="equal length"):
        correlate([1.0, 2.0], [1.0])


def test_penalty_correlation_from_a_runs_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(1)
    kl, w = rng.random(12), rng.random(12)
    rows = [{"step": i, "kl/exact": kl[i].item(), "wasserstein/value": w[i].item()} for i in range(12)]
    rows.insert(3, {"step": 99, "eval_reward": 0.1})  # rows without both keys are skipped
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["analyze", "penalty-correlation", "--run_dir", str(run), "--output_dir", str(out)]) == 0
    report = json.loads((out / "penalty_correlation.json").read_text())
    assert report["source"] == "metrics" and report["n"] == 12
    assert report["pearson_r"] == pytest.approx(stats.pearsonr(kl, w).statistic)
    assert report["slope"] == pytest.approx(stats.linregress(report["kl"], report["wasserstein"]).slope)
    assert (out / "penalty_correlation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_penalty_correlation_recomputed_on_tiny_generations(tmp_path):
    policy, reference = save_tiny_models(tmp_path)
    out = tmp_path / "out"
    argv = ["analyze", "penalty-correlation", "--policy", policy, "--reference", reference, "--prompts"]
    argv += [tiny_prompts(tmp_path), "--num_prompts", "3", "--max_new_tokens", "6", "--output_dir", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "penalty_correlation.json").read_text())
    assert report["source"] == "generations" and report["n"] >= 3
    assert report["pearson_r"] == pytest.approx(stats.pearsonr(report["kl"], report["wasserstein"]).statistic)
    assert (out / "penalty_correlation.png").is_file()


def test_penalty_correlation_config_needs_one_source():
    with pytest.raises(ConfigError, match="either run_dir"):
        PenaltyCorrelationConfig()
    with pytest.raises(ConfigError, match="either run_dir"):
        PenaltyCorrelationConfig(run_dir="r", policy="p", reference="q")


def test_candidate_spread_matches_brute_force():
    torch.manual_seed(0)
    logits, embeddings = torch.randn(5, 30), torch.randn(30, 4)
    spread = candidate_spread(logits, embeddings, k=4)
    for row, value in zip(logits, spread, strict=True):
        top = np.argsort(-row.numpy())[:4]
        pairs = [np.linalg.norm(embeddings[i] - embeddings[j]) for i, j in itertools.combinations(top, 2)]
        assert value.item() == pytest.approx(np.mean(pairs), rel=1e-6)
    cosine = candidate_spread(logits[:1], embeddings, k=2, metric="cosine")
    i, j = torch.topk(logits[0], 2).indices
    assert cosine.item() == pytest.approx(1 - torch.cosine_similarity(embeddings[i], embeddings[j], dim=0).item())


def test_coherence_cli_writes_json_and_plot(tmp_path, capsys):
    folders = save_tiny_models(tmp_path)
    out = tmp_path / "out"
    argv = ["analyze", "coherence", "--models", ",".join(folders), "--prompts", tiny_prompts(tmp_path)]
    assert main(argv + ["--num_prompts", "2", "--max_new_tokens", "4", "--output_dir", str(out)]) == 0
    report = json.loads((out / "coherence.json").read_text())
    assert set(report["models"]) == set(folders)
    assert all(r["mean"] > 0 and r["positions"] >= 2 for r in report["models"].values())
    assert (out / "coherence.png").is_file() and "top-10 spread" in capsys.readouterr().out


def test_unknown_analysis_is_a_clean_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "bert-score"])
    assert exit_info.value.code == 2 and "unknown analysis 'bert-score'" in capsys.readouterr().err


def test_beta_sweep_trains_each_grid_point_and_writes_json_and_plot(tmp_path):
    (model,) = save_tiny_models(tmp_path, seeds=(0,))
    out = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"output_dir: {out}\nregularizers: [rkl, wasserstein]\nbetas: [0.01, 0.1]\n"
        f"eval_prompts: {tiny_prompts(tmp_path)}\nnum_eval_prompts: 3\n"
        f"ppo:\n  model_name_or_path: {model}\n  prompts: {tiny_prompts(tmp_path)}\n  max_steps: 1\n"
        "  per_device_train_batch_size: 2\n  response_length: 4\n  wpr_top_k: 8\n  wpr_max_iter: 50\n"
    )
    assert main(["analyze", "beta-sweep", "--config", str(config)]) == 0
    report = json.loads((out / "beta_sweep.json").read_text())
    grid = [(r["regularizer"], r["beta"]) for r in report["runs"]]
    assert grid == [("rkl", 0.01), ("rkl", 0.1), ("wasserstein", 0.01), ("wasserstein", 0.1)]
    assert all(0.0 <= r["win_rate"] <= 1.0 for r in report["runs"])
    assert all((out / f"{r},beta={b:g},seed=0" / "metrics.jsonl").is_file() for r, b in grid)
    assert (out / "beta_sweep.png").is_file() and (out / "frontier.png").is_file()
    sweep = json.loads((out / "results.json").read_text())  # the same run, as a sweep
    assert [(c["method"], c["setting"]["beta"]) for c in sweep["cells"]] == grid


def test_beta_sweep_rejects_an_unknown_ppo_field():
    from otalign.sweep import BetaSweepConfig

    with pytest.raises(ConfigError, match="base: unknown option 'max_step'; did you mean max_steps"):
        BetaSweepConfig(ppo={"max_step": 3}).sweep()
