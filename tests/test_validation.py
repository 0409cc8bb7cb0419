"""Validation up front: every path a command names (models, data, prompt and generation files, output folders) and
every stage of a pipeline is checked before any model or data loads; each failure is one line, exit status 2, and
nothing is trained or written."""

from __future__ import annotations

import dataclasses
import os

import pytest

from otalign.cli import COMMANDS, Group, main
from otalign.config import ConfigError, ConfigParser
from otalign.models import load_causal_lm
from otalign.models.tiny import save_tiny_model
from otalign.paths import PATH_KINDS, path_problem
from otalign.pipeline import PipelineConfig
from otalign.trainers import GRPOConfig, PPOConfig, PreferenceConfig, SFTConfig, SFTTrainer


def run_error(argv: list[str], capsys) -> str:
    """The one stderr line of a command that fails with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def pairs(tmp_path) -> str:
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "completion": "good"}\n', encoding="utf-8")
    return str(path)


def all_config_classes() -> list[type]:
    commands = [a for c in COMMANDS for a in (c.commands() if isinstance(c, Group) else [c])]
    return [c.config_class() for c in commands]


def test_every_path_field_names_a_known_kind():
    kinds = {
        (cls.__name__, f.name): f.metadata["path"]
        for cls in all_config_classes()
        for f in dataclasses.fields(cls)
        if "path" in f.metadata
    }
    assert kinds[("SFTConfig", "model_name_or_path")] == "model" and kinds[("PPOConfig", "prompts")] == "data"
    assert {kind for kind in kinds.values()} <= set(PATH_KINDS)


@pytest.mark.parametrize("model", ["runs/no/model", "./no-model", "/no/such/model", "~/no-such-otalign-model"])
def test_a_missing_model_folder_is_one_line_and_nothing_is_written(model, pairs, tmp_path, capsys):
    out = tmp_path / "sft"
    line = run_error(["sft", "--model_name_or_path", model, "--dataset_name", pairs, "--output_dir", str(out)], capsys)
    assert line == f"otalign sft: error: --model_name_or_path: model folder {model} does not exist"
    assert not out.exists()


def test_hub_ids_and_builtin_names_pass_and_a_bad_id_does_not(tiny):
    assert path_problem("model", "HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert path_problem("model", "gpt2") is None
    assert path_problem("model", tiny) is None
    assert "neither a local folder" in path_problem("model", "not a model!")
    for cls, argv in (
        (PPOConfig, ["--prompts", "builtin"]),
        (GRPOConfig, []),
        (PreferenceConfig, ["--dataset_name", "builtin"]),
    ):
        config = ConfigParser(cls).parse(argv, validate=True)
        assert config.model_name_or_path == "default"
    assert GRPOConfig().prompts == "arithmetic"


def test_a_run_folder_given_as_model_points_at_its_model(tiny, pairs, tmp_path, capsys):
    run = tmp_path / "runs" / "sft"
    save_tiny_model(run / "model")
    line = run_error(
        ["sft", "--model_name_or_path", str(run), "--dataset_name", pairs, "--output_dir", str(tmp_path / "o")], capsys
    )
    hint = f"(a run folder? its model is {run / 'model'})"
    assert line == f"otalign sft: error: --model_name_or_path: model folder {run} has no config.json {hint}"
    assert not (tmp_path / "o").exists()


def test_the_loader_names_a_missing_model_folder_without_a_hub_lookup(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^model folder {tmp_path}/gone does not exist$"):
        load_causal_lm(str(tmp_path / "gone"))


def test_missing_input_files_are_named_with_their_option(tiny, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    line = run_error(["dpo", "--model_name_or_path", tiny, "--dataset_name", str(missing)], capsys)
    assert line == f"otalign dpo: error: --dataset_name: dataset {missing} does not exist"
    line = run_error(["ppo", "--model_name_or_path", tiny, "--prompts", str(missing)], capsys)
    assert line == f"otalign ppo: error: --prompts: dataset {missing} does not exist"
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "response": "b"}\n')
    line = run_error(["eval", "--generation_files", str(good), str(missing)], capsys)
    assert line == f"otalign eval: error: --generation_files: file {missing} does not exist"
    line = run_error(["ppo", "--model_name_or_path", tiny, "--resume_from_checkpoint", str(tmp_path / "ck")], capsys)
    assert line == f"otalign ppo: error: --resume_from_checkpoint: folder {tmp_path / 'ck'} does not exist"


def test_an_output_folder_that_cannot_be_created_is_reported_before_loading(tiny, pairs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "sft"
    line = run_error(["sft", "--model_name_or_path", tiny, "--dataset_name", pairs, "--output_dir", str(out)], capsys)
    assert line == f"otalign sft: error: --output_dir: cannot create {out}: {blocker} is not a writable folder"


def test_a_path_from_a_config_file_names_the_file(pairs, tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: runs/x/model\ndataset_name: {pairs}\n")
    line = run_error(["sft", "--config", str(config), "--output_dir", str(tmp_path / "o")], capsys)
    assert line == f"otalign sft: error: {config}: model_name_or_path: model folder runs/x/model does not exist"


def test_a_trainer_checks_its_paths_before_loading(pairs, tmp_path):
    config = SFTConfig(model_name_or_path="runs/no/model", dataset_name=pairs, output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="^model_name_or_path: model folder runs/no/model does not exist$"):
        SFTTrainer(config)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--ppo.per_device_train_batch_size", "0", "ppo: per_device_train_batch_size must be >= 1, got 0"),
        ("--ppo.lr_scheduler_type", "nope", "ppo: unknown lr_scheduler_type 'nope'"),
        ("--ppo.reward_fn", "sentiment", "ppo: set reward_fn: null when using reward_model_name_or_path"),
        (
            "--reward.eval_dataset_name",
            "held_out.jsonl",
            "reward.eval_dataset_name: dataset held_out.jsonl does not exist",
        ),
        ("--eval.judge_model", "runs/judge/model", "eval.judge_model: model folder runs/judge/model does not exist"),
    ],
)
def test_pipeline_checks_every_stage_before_the_first_runs(option, value, message, tiny, tmp_path, capsys):
    out = tmp_path / "pipeline"
    line = run_error(["pipeline", "--output_dir", str(out), "--model_name_or_path", tiny, option, value], capsys)
    assert line.startswith(f"otalign pipeline: error: {message}")
    assert not (out / "data").exists() and not (out / "sft").exists()


def test_pipeline_links_need_not_exist_before_their_stage_runs(tiny, tmp_path):
    config = PipelineConfig(output_dir=str(tmp_path / "p"), model_name_or_path=tiny, ppo={"max_steps": 1})
    config.validate()  # sft/model, reward/model and data/*.jsonl are written by the stages themselves
    with pytest.raises(ConfigError, match="^model_name_or_path: model folder /gone does not exist"):
        PipelineConfig(output_dir=str(tmp_path / "p"), model_name_or_path="/gone").validate()


def _broken_copy(tiny: str, folder, name: str, keep: int | None):
    """A copy of the tiny model whose weight file ``name`` keeps its first ``keep`` bytes (None: removed)."""
    import shutil
    from pathlib import Path

    shutil.copytree(tiny, folder)
    path = Path(folder) / name
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


@pytest.mark.parametrize("keep", [0, 5, 20_000, -1])
@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["sft", "--dataset_name", "{pairs}"], "--model_name_or_path"),
        (["ppo", "--model_name_or_path", "{tiny}", "--reward_fn", "none"], "--reward_model_name_or_path"),
        (["grpo", "--reward_fn", "arithmetic"], "--model_name_or_path"),
    ],
)
def test_an_empty_or_truncated_weight_file_is_one_line_naming_it(command, option, keep, tiny, pairs, tmp_path, capsys):
    """A 0-byte or cut-short ``model.safetensors`` as policy, reward model or SFT start is named before anything
    loads (the header's sizes against the file's)."""
    broken = _broken_copy(tiny, tmp_path / "broken", "model.safetensors", keep)
    argv = [word.format(pairs=pairs, tiny=tiny) for word in command]
    line = run_error([*argv, option, str(tmp_path / "broken"), "--output_dir", str(tmp_path / "out")], capsys)
    assert line.startswith(f"otalign {command[0]}: error: {option}: weight file {broken} is ")
    assert ("empty (0 bytes)" if keep == 0 else "truncated") in line
    assert not (tmp_path / "out").exists()


def test_weight_files_of_whole_models_pass_and_broken_ones_are_named(tiny, tmp_path):
    """A whole folder passes; a cut-short torch ``.bin`` and an index naming a missing shard are named."""
    import torch

    from otalign.paths import weights_problem

    assert weights_problem(tiny) is None
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({"w": torch.zeros(1000)}, folder / "pytorch_model.bin")
    assert weights_problem(folder) is None
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert "pytorch_model.bin is truncated" in weights_problem(folder)
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00002.safetensors"}}')
    assert weights_problem(folder).endswith("names shards that are missing: model-00002.safetensors")


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a hub endpoint that cannot be reached."""
    from otalign.paths import hub_unreachable

    for name in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_DATASETS_CACHE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://no-such-host.invalid")
    hub_unreachable.cache_clear()
    yield tmp_path / "hf"
    hub_unreachable.cache_clear()


@pytest.mark.parametrize(
    ("option", "value", "noun"),
    [("--model_name_or_path", "someone/model", "a local model folder"), ("--dataset_name", "someone/data", "a local")],
)
def test_a_hub_name_with_no_network_is_one_line_naming_the_option(option, value, noun, no_hub, tiny, pairs, capsys):
    """No retries storm: an id that is neither a local path nor cached is refused before anything loads."""
    argv = ["sft", "--model_name_or_path", tiny, "--dataset_name", pairs, "--output_dir", str(no_hub / "out")]
    argv[argv.index(option) + 1] = value
    line = run_error(argv, capsys)
    assert line.startswith(f"otalign sft: error: {option}: {value!r} is not {noun}")
    assert "nothing may be downloaded: no network (no-such-host.invalid cannot be reached" in line


def test_a_cached_hub_id_passes_offline_and_an_offline_variable_is_named(no_hub, monkeypatch):
    from otalign.paths import hub_problem

    assert "no network" in hub_problem("model", "someone/model")
    (no_hub / "hub" / "models--someone--model").mkdir(parents=True)
    assert hub_problem("model", "someone/model") is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_problem("model", "gpt2").endswith("nothing may be downloaded: HF_HUB_OFFLINE is set")
    assert hub_problem("model", "./local/folder") is None  # local paths are path_problem's


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_an_output_under_a_pseudo_filesystem_is_refused_before_loading(tiny, pairs, capsys):
    """``os.access`` says yes to root on ``/proc``; a probe folder says no."""
    line = run_error(["sft", "--model_name_or_path", tiny, "--dataset_name", pairs, "--output_dir", "/proc/x"], capsys)
    assert line.startswith("otalign sft: error: --output_dir: cannot create /proc/x: /proc ")


@pytest.mark.parametrize("encoder", ["/no/such/encoder", "not-an-encoder", "/proc/x"])
def test_a_bad_encoder_is_one_line_before_any_model_loads(encoder, tiny, tmp_path, capsys):
    argv = ["analyze", "semantic-similarity", "--policy", tiny, "--reference", tiny, "--encoder", encoder]
    line = run_error([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert line == (
        f"otalign analyze semantic-similarity: error: --encoder: {encoder!r} is neither 'minilm' nor an existing "
        "local encoder folder"
    )
    assert not (tmp_path / "out").exists()


def test_a_sweep_checks_its_encoder_before_the_first_cell(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nanalyses: [semantic_similarity]\nencoder: {tmp_path / 'enc'}\n")
    line = run_error(["sweep", "--config", str(path)], capsys)
    assert line.endswith(f"encoder: '{tmp_path / 'enc'}' is neither 'minilm' nor an existing local encoder folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["token-geometry", "--eps", "1e300"], "--eps must be in (0, 100], got 1e+300"),
        (
            ["analyze", "penalty-correlation", "--run_dir", ".", "--lam", "1e300"],
            "--lam must be in (0, 1e6], got 1e+300",
        ),
        (
            ["analyze", "semantic-similarity", "--policy", "p", "--reference", "r", "--temperature", "1e-300"],
            "--temperature must be in [1e-3, 1e3], got 1e-300",
        ),
        (["eval", "--judge_timeout", "1e300"], "--judge_timeout must be in (0, 86400], got 1e+300"),
    ],
)
def test_absurd_numbers_for_analysis_options_are_refused_naming_the_option(argv, message, tmp_path, capsys):
    line = run_error([*argv, "--output_dir" if argv[0] != "token-geometry" else "--out", str(tmp_path / "o")], capsys)
    assert line.endswith(message)
    assert not (tmp_path / "o").exists()
