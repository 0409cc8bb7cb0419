"""``otalign eval`` end to end: generation files and tiny local models, every pair judged, JSON + table written."""

from __future__ import annotations

import json

import pytest

from otalign.cli import main
from otalign.eval.config import EvalConfig
from otalign.eval.generations import read_generations
from otalign.eval.run import candidate_names, run_eval
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import ConfigError

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def generation_files(tmp_path):
    prompts = [f"Write about day {i}." for i in range(12)]
    happy = write_jsonl(tmp_path / "happy.jsonl", [{"prompt": p, "response": "a wonderful happy day"} for p in prompts])
    sad = write_jsonl(tmp_path / "sad.jsonl", [{"prompt": p, "response": "an awful sad day"} for p in prompts[::-1]])
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": p, "response": "an awful sad day"} for p in prompts])
    return happy, sad, same


def test_generation_files_with_the_sentiment_judge(tmp_path, generation_files, capsys):
    config = EvalConfig(
        output_dir=str(tmp_path / "out"), generation_files=list(generation_files), num_prompts=5, num_repeats=3
    )
    result = run_eval(config)
    pairs = {(p["model"], p["opponent"]): p for p in result["pairs"]}
    assert set(pairs) == {("happy", "sad"), ("happy", "same"), ("sad", "same")}
    assert pairs["happy", "sad"]["win_rate_mean"] == 1.0 and pairs["happy", "sad"]["win_rate_std"] == 0.0
    assert pairs["sad", "same"]["win_rate_mean"] == 0.5  # identical answers: all ties
    assert pairs["sad", "same"]["total"] == {"wins": 0, "ties": 15, "losses": 0, "malformed": 0, "win_rate": 0.5}
    out = tmp_path / "out"
    assert json.loads((out / "winrates.json").read_text())["judge"] == "reward:sentiment"
    rows = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3 * 5 and {r["swapped"] for r in rows} == {True, False}
    assert "| happy | sad | 1.000 ± 0.000 | 15 / 0 / 0 | 0 |" in capsys.readouterr().out
    assert (out / "table.md").is_file() and len((out / "samples.jsonl").read_text().splitlines()) == 15


def save_tiny_models(tmp_path, seeds=(0, 1)) -> list[str]:
    """Folders ``model<seed>`` holding tiny random causal LMs with the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    folders = []
    for seed in seeds:
        folder = tmp_path / f"model{seed}"
        tiny_causal_lm(tokenizer, seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def tiny_prompts(tmp_path) -> str:
    """A prompt file in the tiny tokenizer's vocabulary."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tell me about your day\nwrite one sentence about a cat\ndescribe the city\n")
    return str(prompts)


def test_tiny_models_generate_and_the_cli_writes_the_report(tmp_path):
    folders = save_tiny_models(tmp_path)
    prompts = tiny_prompts(tmp_path)
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"models: [{folders[0]}, {folders[1]}]\nprompts: {prompts}\nnum_prompts: 2\nnum_repeats: 2\n"
        f"max_new_tokens: 5\noutput_dir: {tmp_path / 'out'}\n"
    )
    assert main(["eval", "--config", str(config), "--seed", "3"]) == 0
    report = json.loads((tmp_path / "out" / "winrates.json").read_text())
    assert report["candidates"] == ["model0", "model1"] and report["config"]["seed"] == 3
    (pair,) = report["pairs"]
    assert sum(pair["total"][k] for k in ("wins", "ties", "losses")) == 4
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(set(s["responses"]) == {"model0", "model1"} for s in samples)


def test_bad_input_is_reported_with_file_and_row(tmp_path, generation_files):
    happy, sad, _ = generation_files
    with pytest.raises(ConfigError, match="two or more candidates"):
        EvalConfig(generation_files=[happy])
    with pytest.raises(ConfigError, match="needs judge_model"):
        EvalConfig(generation_files=[happy, sad], judge="chat_model")
    with pytest.raises(ConfigError, match="judge_template: unknown judge template 'poem'"):
        EvalConfig(generation_files=[happy, sad], judge="http", judge_template="poem")
    short = write_jsonl(tmp_path / "short.jsonl", [{"prompt": "Write about day 0.", "response": "ok"}])
    with pytest.raises(ValueError, match="happy has 11 prompt"):
        run_eval(EvalConfig(output_dir=str(tmp_path / "o"), generation_files=[happy, short]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "q"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, row 2: field 'response'"):
        read_generations(broken)
    assert candidate_names(EvalConfig(generation_files=[happy, happy], models=["x/happy"])) == (
        ["happy", "happy-2"],
        ["happy-3"],
    )


def test_chat_model_judge_from_config_counts_malformed_verdicts(tmp_path, generation_files):
    (judge,) = save_tiny_models(tmp_path, seeds=(5,))
    config = EvalConfig(
        output_dir=str(tmp_path / "out"),
        generation_files=list(generation_files[:2]),
        num_prompts=3,
        num_repeats=1,
        judge="chat_model",
        judge_model=judge,
        judge_template="{prompt} a : {response_a} b : {response_b}",
        judge_max_new_tokens=3,
    )
    (pair,) = run_eval(config)["pairs"]
    assert sum(pair["total"][k] for k in ("wins", "ties", "losses", "malformed")) == 3
    rows = [json.loads(line) for line in (tmp_path / "out" / "comparisons.jsonl").read_text().splitlines()]
    assert all((r["verdict"] is None) == (r["score"] is None) for r in rows)
