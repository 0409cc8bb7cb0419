"""``otalign pipeline`` (data -> sft -> reward -> ppo -> eval, completed stages skipped), ``otalign data synth``
and ``otalign data prepare``: on tiny random models saved to disk, plus one slow run on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

from otalign.cli import main
from otalign.demos.synth import SynthConfig, synthesize
from otalign.models.tiny import save_tiny_model, tiny_causal_lm, tiny_tokenizer
from otalign.pipeline import STAGES, Pipeline, parse_pipeline_config
from otalign.trainers import ConfigError, read_metrics

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FIXTURES = Path(__file__).parent / "fixtures"
FAST = {"progress_bar": False, "per_device_train_batch_size": 2}


def tiny_pipeline_yaml(tmp_path: Path) -> Path:
    config = {
        "output_dir": str(tmp_path / "run"),
        "model_name_or_path": save_tiny_model(tmp_path / "base"),
        "dataset": str(FIXTURES / "preference_pairs.jsonl"),
        "sft": {**FAST, "max_steps": 2, "learning_rate": 1e-3},
        "reward": {**FAST, "max_steps": 2, "learning_rate": 1e-3},
        "ppo": {**FAST, "max_steps": 1, "response_length": 4},
        "eval": {"num_prompts": 2, "num_repeats": 1, "max_new_tokens": 4},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pipeline_runs_every_stage_then_skips_them(tmp_path, capsys):
    config = tiny_pipeline_yaml(tmp_path)
    assert main(["pipeline", "--config", str(config), "--reward.max_steps", "3"]) == 0
    run = tmp_path / "run"
    for stage in STAGES:
        assert (run / stage / "COMPLETE").is_file(), stage
    assert json.loads((run / "data" / "COMPLETE").read_text())["sft"] == 2  # round(0.2 * 12)
    for stage in ("sft", "reward", "ppo"):
        assert (run / stage / "model" / "config.json").is_file()
        assert read_metrics(run / stage)
    reward = read_metrics(run / "reward")
    assert reward[-2]["step"] == 3  # the command-line override reached the stage
    assert "eval_accuracy" in reward[-1]
    assert AutoConfig.from_pretrained(run / "reward" / "model").num_labels == 1
    assert json.loads((run / "eval" / "winrates.json").read_text())
    capsys.readouterr()
    status = Pipeline(parse_pipeline_config(config)).run()
    assert status == dict.fromkeys(STAGES, "skipped")


def test_pipeline_config_errors_name_the_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'sft.max_step'; did you mean sft.max_steps"):
        parse_pipeline_config(None, ["--sft.max_step", "3"])
    with pytest.raises(ConfigError, match="unknown stage"):
        parse_pipeline_config(None, ["--stages", "sft,rl"])
    with pytest.raises(ConfigError, match="--ppo.beta: expected a number"):
        parse_pipeline_config(None, ["--ppo.beta", "high"])


def test_data_prepare_converts_and_splits(tmp_path, capsys):
    out = tmp_path / "prepared"
    argv = ["data", "prepare", "--dataset", str(FIXTURES / "hh_rlhf.jsonl"), "--dataset_format", "hh-rlhf"]
    assert main([*argv, "--output_dir", str(out), "--split_fractions", "0.34,0.33,0.33"]) == 0
    counts = {name: len((out / f"{name}.jsonl").read_text().splitlines()) for name in ("sft", "reward", "rl")}
    assert counts == {"sft": 1, "reward": 1, "rl": 1}
    assert '"pairs": 3' in capsys.readouterr().out


def test_synthesize_picks_best_and_worst_and_counts_ties():
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=3)
    prompts = ["write about the cat .", "tell about the dog .", "describe the sun .", "what is the food ?"]
    config = SynthConfig(num_samples=4, max_new_tokens=6, batch_size=2, temperature=1.5)

    def goods(prompts, responses):
        return [r.split().count("good") - r.split().count("bad") for r in responses]

    result = synthesize(model, tokenizer, prompts, goods, config)
    again = synthesize(model, tokenizer, prompts, goods, SynthConfig(**{**config.__dict__, "batch_size": 4}))
    assert again.rows == result.rows  # seeded per prompt and sample, whatever the batching
    assert len(result.rows) + sum(map(len, result.skipped.values())) == len(prompts)
    for row in result.rows:
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert goods(None, [chosen])[0] > goods(None, [rejected])[0]


@pytest.mark.slow
def test_pipeline_on_the_default_model_with_the_builtin_demo_data(tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "sft": {**FAST, "max_steps": 1, "max_length": 256},
        "reward": {**FAST, "max_steps": 1, "max_length": 256},
        "ppo": {**FAST, "max_steps": 1, "response_length": 8},
        "eval": {"num_prompts": 2, "num_repeats": 1, "max_new_tokens": 8},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(path)]) == 0
    for stage in STAGES:
        assert (tmp_path / "run" / stage / "COMPLETE").is_file(), stage
    for stage in ("sft", "reward", "ppo"):
        assert read_metrics(tmp_path / "run" / stage)
        assert (tmp_path / "run" / stage / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "eval" / "winrates.json").read_text())


def test_data_synth_command_writes_pairs_or_explains_why_not(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"tell about the {w} .\n" for w in ("cat", "dog", "sun", "rain", "food", "city")))
    out = tmp_path / "synth.jsonl"
    argv = ["data", "synth", "--model_name_or_path", save_tiny_model(tmp_path / "base"), "--prompts", str(prompts)]
    argv += ["--output", str(out), "--num_samples", "4", "--max_new_tokens", "6", "--temperature", "2.0"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)
    assert f"kept {len(rows)} of 6 rows" in capsys.readouterr().out


def test_pipeline_on_hh_rlhf_conversations(tmp_path):
    """HH-RLHF transcripts flow through as chat messages: SFT on the chosen replies, reward pairs, PPO prompts."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}answer : {{ m['content'] }} <eos> "
        "{% else %}{{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}answer : {% endif %}"
    )
    argv = [
        "--output_dir",
        str(tmp_path / "run"),
        "--model_name_or_path",
        save_tiny_model(tmp_path / "base", tokenizer),
    ]
    argv += [
        "--dataset",
        str(FIXTURES / "hh_rlhf.jsonl"),
        "--dataset_format",
        "hh-rlhf",
        "--stages",
        "data,sft,reward,ppo",
    ]
    argv += ["--split_fractions", "0.34,0.33,0.33", "--sft.max_steps", "1", "--reward.max_steps", "1"]
    argv += ["--ppo.max_steps", "1", "--ppo.response_length", "4", "--ppo.per_device_train_batch_size", "1"]
    argv += [f"--{stage}.progress_bar=false" for stage in ("sft", "reward", "ppo")]
    status = Pipeline(parse_pipeline_config(None, argv)).run()
    assert status == {"data": "ran", "sft": "ran", "reward": "ran", "ppo": "ran"}
    rl = json.loads((tmp_path / "run" / "data" / "rl.jsonl").read_text())
    assert rl["prompt"][0]["role"] == "user"
    assert read_metrics(tmp_path / "run" / "ppo")[0]["step"] == 1
