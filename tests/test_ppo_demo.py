"""The main job end to end, on a tiny random model saved to disk (``make demo`` itself runs the default model)."""

from __future__ import annotations

import json

import pytest

from otalign.cli import main
from otalign.demos.ppo_demo import DemoConfig
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import ConfigError, parse_config


def test_demo_options_map_onto_the_demo_config():
    config = parse_config(DemoConfig, None, ["--max_steps", "3", "--use_peft", "false", "--out", "x"])
    assert config.max_steps == 3 and config.use_peft is False and config.out == "x"
    with pytest.raises(ConfigError, match="unknown option 'steps'; did you mean max_steps"):
        parse_config(DemoConfig, None, ["--steps", "3"])


def test_token_geometry_stays_reachable(tmp_path, capsys):
    assert main(["token-geometry", "--out", str(tmp_path)]) == 0


def test_demo_writes_the_report(tmp_path, torch_single_thread):
    model_dir = tmp_path / "tiny"
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--model_name_or_path", str(model_dir), "--max_steps", "2"]
    argv += ["--batch_size", "4", "--response_length", "6", "--eval_prompts", "4", "--wpr_top_k", "8"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"reference", "wpr", "rkl"}
    for name, method in report["methods"].items():
        for key in ("reward_mean", "reward_ci95", "kl_per_token", "ot_per_token"):
            assert key in method, (name, key)
    assert report["methods"]["reference"]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert report["methods"]["reference"]["ot_per_token"] == pytest.approx(0.0, abs=1e-6)  # debiased distance
    assert 0.0 <= report["methods"]["wpr"]["win_rate"] <= 1.0
    assert (out / "frontier.png").stat().st_size > 10_000
    samples = (out / "samples.md").read_text()
    assert samples.count("**reference**") == 4 and samples.count("**wpr**") == 4
    assert (out / "wpr" / "metrics.jsonl").is_file() and (out / "rkl" / "metrics.jsonl").is_file()
