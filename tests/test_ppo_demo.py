"""The main job end to end on the embedded default model, at a tiny scale (slow: loads SmolLM2-135M)."""

from __future__ import annotations

import json

import pytest

from otalign.cli import main
from otalign.demos.ppo_demo import DemoConfig
from otalign.trainers import ConfigError, parse_config


def test_demo_options_map_onto_the_demo_config():
    config = parse_config(DemoConfig, None, ["--max_steps", "3", "--use_peft", "false", "--out", "x"])
    assert config.max_steps == 3 and config.use_peft is False and config.out == "x"
    with pytest.raises(ConfigError, match="unknown option 'steps'; did you mean max_steps"):
        parse_config(DemoConfig, None, ["--steps", "3"])


def test_token_geometry_stays_reachable(tmp_path, capsys):
    assert main(["token-geometry", "--out", str(tmp_path)]) == 0


@pytest.mark.slow
def test_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--max_steps", "1", "--batch_size", "2", "--response_length", "4"]
    argv += ["--eval_prompts", "2", "--wpr_max_iter", "50"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"reference", "wpr", "rkl"}
    for name, method in report["methods"].items():
        for key in ("reward_mean", "reward_ci95", "kl_per_token", "ot_per_token"):
            assert key in method, (name, key)
    assert report["methods"]["reference"]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= report["methods"]["wpr"]["win_rate"] <= 1.0
    assert (out / "frontier.png").stat().st_size > 10_000
    samples = (out / "samples.md").read_text()
    assert samples.count("**reference**") == 2 and samples.count("**wpr**") == 2
    assert (out / "wpr" / "metrics.jsonl").is_file() and (out / "rkl" / "metrics.jsonl").is_file()
