"""The command table: every field of every command in ``--help``; every class of user error is one line and exit 2."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import typing

import pytest

from otalign.cli import COMMANDS, Group, main
from otalign.config import ConfigError, ConfigParser, resolve


def all_commands():
    return [a for c in COMMANDS for a in (c.commands() if isinstance(c, Group) else [c])]


COMMAND_NAMES = [c.name for c in all_commands()]


def expected_options(cls: type) -> set[str]:
    """``--field`` of every field, and ``--section.field`` of every field of a section's class."""
    names = set()
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            names |= {f"{f.name}.{s.name}" for s in dataclasses.fields(resolve(f.metadata["section"]))}
        else:
            names.add(f.name)
    return names


@pytest.mark.parametrize("command", all_commands(), ids=COMMAND_NAMES)
def test_help_lists_every_field_with_type_default_and_help(command, capsys):
    cls = command.config_class()
    with pytest.raises(SystemExit) as exit_info:
        main([*command.name.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    expected = expected_options(cls)
    listed = set(re.findall(r"^  --([\w.]+)", text, flags=re.M)) - {"config", "help"}
    complements = {n for n in listed if n not in expected and re.sub(r"^(\w+\.)?no_", r"\1", n) in expected}
    assert listed - complements == expected
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        if "section" not in f.metadata:
            block = re.search(rf"^  --{f.name}\b.*?(?=^  --|\Z)", text, flags=re.M | re.S).group(0)
            assert "(default:" in block, f.name
            if f.metadata.get("choices") is None and typing.get_origin(hints[f.name]) is not list:
                assert re.search(r"[A-Z]{3,}", block.splitlines()[0]), f"no type shown for {f.name}"


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(c.name in text for c in COMMANDS)


@dataclasses.dataclass
class ToyAnalysisConfig:
    """Settings of a toy analysis."""

    output_dir: str = dataclasses.field(default="out", metadata={"help": "where it writes"})


@pytest.fixture
def analyses(monkeypatch):
    """The analysis registry with every built-in (the sweep adds ``beta-sweep``) and a toy one registered by the
    test (removed afterwards)."""
    import otalign.sweep  # noqa: F401
    from otalign.eval.analysis import ANALYSES

    monkeypatch.setattr(ANALYSES, "entries", dict(ANALYSES.entries))
    ANALYSES.add("toy-analysis", lambda config: 0, help="a toy analysis", config=ToyAnalysisConfig)
    return ANALYSES


def test_help_lists_every_registered_analysis(analyses, capsys):
    """``otalign analyze --help`` lists each registered analysis with its help; the top-level line names all of
    them or none (``otalign --help`` imports no analysis), never a partial list."""
    assert {"penalty-correlation", "coherence", "semantic-similarity", "beta-sweep", "apps"} < set(analyses)
    assert main(["--help"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  analyze ")]
    assert len({name for name in analyses if name in line}) in (0, len(analyses)), line
    assert main(["analyze", "--help"]) == 0
    listed = re.findall(r"^  analyze (\S+)\s+(.*)$", capsys.readouterr().out, flags=re.M)
    assert listed == [(name, analyses.entry(name).help) for name in analyses]


def test_a_fresh_process_lists_the_analyses_registered_above_eval():
    """``beta-sweep`` is registered by otalign.sweep, a layer above the registry: the CLI imports it itself."""
    import subprocess
    import sys

    code = "from otalign.cli import main; main(['analyze', '--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^  analyze beta-sweep\s", out, flags=re.M), out


def run_error(argv, capsys, monkeypatch=None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def first_field(cls: type, predicate):
    hints = typing.get_type_hints(cls)
    return next(f for f in dataclasses.fields(cls) if predicate(f, hints[f.name]))


@pytest.mark.parametrize("command", all_commands(), ids=COMMAND_NAMES)
def test_each_class_of_config_error_is_one_line_naming_the_file_or_option(command, tmp_path, capsys):
    cls = command.config_class()
    argv = command.name.split()
    prefix = f"otalign {command.name}: error: "
    name = next(f.name for f in dataclasses.fields(cls))
    line = run_error([*argv, f"--{name}x", "1"], capsys)
    assert line.startswith(prefix) and f"unknown option '{name}x'; did you mean {name}" in line
    line = run_error([*argv, "--config", str(tmp_path / "missing.yaml")], capsys)
    assert line == f"{prefix}config file {tmp_path / 'missing.yaml'} does not exist"
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    assert run_error([*argv, "--config", str(bad)], capsys).startswith(f"{prefix}{bad}: not valid YAML")
    bad.write_text(f"{name}x: 1\n")
    assert f"{bad}: unknown option '{name}x'" in run_error([*argv, "--config", str(bad)], capsys)
    number = first_field(cls, lambda f, t: t in (int, float))
    kind = "an integer" if typing.get_type_hints(cls)[number.name] is int else "a number"
    line = run_error([*argv, f"--{number.name}", "many"], capsys)
    assert line == f"{prefix}--{number.name}: expected {kind}, got 'many'"
    bad.write_text(f"{number.name}: many\n")
    line = run_error([*argv, "--config", str(bad)], capsys)
    assert line == f"{prefix}{bad}: {number.name}: expected {kind}, got 'many'"


def checked_fields():
    """(command, field, a value outside its check or choices) for every checked field of every command."""
    cases = []
    for command in all_commands():
        cls = command.config_class()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rule, choices = f.metadata.get("check"), f.metadata.get("choices")
            if rule is not None:
                bad = "-1" if not rule.startswith(">= -") else "-1e9"
                if rule.strip() in ("<= 1", "< 1"):
                    bad = "2"
                cases.append(pytest.param(command, f.name, bad, id=f"{command.name}-{f.name}"))
            elif choices is not None and typing.get_origin(hints[f.name]) is not list:
                cases.append(pytest.param(command, f.name, "nonsense", id=f"{command.name}-{f.name}"))
    return cases


@pytest.mark.parametrize(("command", "name", "value"), checked_fields())
def test_invalid_values_are_rejected_before_anything_loads(command, name, value, capsys):
    line = run_error([*command.name.split(), f"--{name}", value], capsys)
    assert line.startswith(f"otalign {command.name}: error: --{name}"), line
    assert "must be" in line or "unknown" in line


def test_dpo_beta_minus_one_and_zero_sizes_fail_in_parsing():
    from otalign.trainers import PreferenceConfig

    parser = ConfigParser(PreferenceConfig)
    with pytest.raises(ConfigError, match=r"--beta must be > 0, got -1.0"):
        parser.parse(["--beta", "-1"])
    with pytest.raises(ConfigError, match=r"--per_device_train_batch_size must be >= 1, got 0"):
        parser.parse(["--per_device_train_batch_size", "0"])
    with pytest.raises(ConfigError, match=r"--learning_rate must be >= 0, got -0.001"):
        parser.parse(["--learning_rate", "-1e-3"])
    with pytest.raises(ConfigError, match=r"label_smoothing does not apply to loss_type 'sigmoid'"):
        parser.parse(["--label_smoothing", "0.1"])
    with pytest.raises(ConfigError, match=r"label_smoothing needs aot_h logistic"):
        parser.parse(["--loss_type", "aot", "--aot_h", "lsq", "--label_smoothing", "0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'sigmoid'"):
        parser.parse(["--loss_type", "sigmod"])


def test_unknown_command_and_action_suggest_the_closest(capsys):
    line = run_error(["pp"], capsys)
    assert "unknown command 'pp'" in line and "did you mean 'ppo'" in line
    assert "unknown action 'synt'" in run_error(["data", "synt"], capsys)
    assert "unknown analysis 'coherance'" in run_error(["analyze", "coherance"], capsys)


def test_missing_files_and_bad_rows_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    line = run_error(["dpo", "--dataset_name", str(missing)], capsys)
    assert line.startswith("otalign dpo: error:") and str(missing) in line
    line = run_error(["ppo", "--prompts", str(missing)], capsys)
    assert line.startswith("otalign ppo: error:") and "does not exist" in line
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    line = run_error(["dpo", "--dataset_name", str(rows)], capsys)
    assert f"{rows}, row 2" in line and "rejected" in line
    rows.write_text('{"prompt": "a"}\nnot json\n')
    line = run_error(["ppo", "--prompts", str(rows)], capsys)
    assert "row 2" in line and "not valid JSON" in line
    line = run_error(["data", "prepare", "--dataset", str(missing)], capsys)
    assert line.startswith("otalign data prepare: error:") and "nope.jsonl" in line
    line = run_error(["sft", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(rows)], capsys)
    assert line.startswith("otalign sft: error:")


def test_debug_environment_variable_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("OTALIGN_DEBUG", "1")
    with pytest.raises(ConfigError, match="--beta must be > 0"):
        main(["dpo", "--beta", "-1"])


def test_yaml_then_command_line_and_nested_section_options(tmp_path):
    from otalign.pipeline import PipelineConfig

    path = tmp_path / "p.yaml"
    path.write_text("seed: 3\nppo:\n  max_steps: 5\n  beta: 0.2\n")
    config = ConfigParser(PipelineConfig).parse(["--config", str(path), "--ppo.max_steps", "7", "--stages", "sft,ppo"])
    assert config.seed == 3 and config.ppo == {"max_steps": 7, "beta": 0.2} and config.stages == ["sft", "ppo"]
    with pytest.raises(ConfigError, match=r"--ppo.beta: expected a number, got 'high'"):
        ConfigParser(PipelineConfig).parse(["--ppo.beta", "high"])
    with pytest.raises(ConfigError, match=r"ppo: beta must be >= 0"):
        ConfigParser(PipelineConfig).parse(["--ppo.beta", "-1"])


def test_a_group_without_an_action_is_an_error_and_its_help_lists_the_actions(capsys):
    for group, kind in (("data", "action"), ("analyze", "analysis")):
        assert run_error([group], capsys).startswith(f"otalign {group}: error: missing {kind}; choose one of")
        assert main([group, "--help"]) == 0
        listed = re.findall(rf"^  {group} (\S+)\s", capsys.readouterr().out, flags=re.M)
        expected = [c.name.split(" ", 1)[1] for c in all_commands() if c.name.startswith(f"{group} ")]
        assert listed == expected


def test_output_paths_of_the_wrong_kind_are_refused_before_anything_loads(tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("x")
    for argv in (["dpo", "--output_dir"], ["ppo", "--output_dir"], ["data", "prepare", "--output_dir"]):
        line = run_error([*argv, str(file)], capsys)
        assert line.endswith(f"{argv[-1]}: {file} is a file, not a folder; give a folder to write into"), line
    line = run_error(["data", "synth", "--output", str(tmp_path)], capsys)
    assert line.endswith(f"--output: {tmp_path} is a folder; give the name of the file to write"), line


def test_schedules_that_need_a_metric_or_extra_arguments_are_not_offered(capsys):
    line = run_error(["ppo", "--lr_scheduler_type", "reduce_lr_on_plateau"], capsys)
    assert "--lr_scheduler_type: unknown lr_scheduler_type 'reduce_lr_on_plateau'; choose one of" in line
    import torch
    from transformers import get_scheduler

    from otalign.trainers.config import _schedulers

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    for name in _schedulers():  # every offered schedule builds and steps as the trainers drive it
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=4)
        optimizer.step()
        scheduler.step()


def test_reward_fn_none_is_the_null_of_yaml(tmp_path):
    from otalign.trainers import PPOConfig

    argv = ["--reward_fn", "none", "--reward_model_name_or_path", "owner/reward"]
    assert ConfigParser(PPOConfig).parse(argv).reward_fn is None
    with pytest.raises(ConfigError, match=r"^--reward_fn: no reward given; choose one: --reward_fn sentiment .*"):
        ConfigParser(PPOConfig).parse(["--reward_fn", "none"])


def test_a_yaml_key_given_twice_is_refused_naming_it_and_its_lines(tmp_path, capsys):
    config = tmp_path / "dpo.yaml"
    config.write_text("beta: 0.1\nmax_steps: 3\nbeta: 0.2\n")
    line = run_error(["dpo", "--config", str(config)], capsys)
    assert line == f"otalign dpo: error: {config}: key 'beta' appears twice (lines 1 and 3)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dpo", "--lora_r", "4"], "--lora_r sets up LoRA, which needs use_peft (set use_peft: true)"),
        (["ppo", "--lora_target_modules", "q_proj"], "--lora_target_modules sets up LoRA, which needs use_peft"),
        (["dpo", "--otpo_eps1", "0.5"], "--otpo_eps1 applies with token_weighting otpo only"),
        (
            ["dpo", "--resume", "--overwrite_output_dir"],
            "--resume continues the run in output_dir, overwrite_output_dir",
        ),
    ],
)
def test_options_that_would_be_ignored_or_contradict_are_refused(argv, message, capsys):
    line = run_error([*argv, "--model_name_or_path", "missing/model/folder"], capsys)
    assert line.startswith(f"otalign {argv[0]}: error: {message}"), line


def test_the_same_options_where_they_apply_are_accepted():
    from otalign.trainers import PPOConfig, PreferenceConfig

    assert PreferenceConfig(use_peft=True, lora_r=4).lora_r == 4
    assert PreferenceConfig(token_weighting="otpo", otpo_eps1=0.5).otpo_eps1 == 0.5
    assert PPOConfig(use_peft=True, lora_target_modules=["q_proj"]).use_peft


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--models", "a", "b", "--seed", "-5"], "--seed must be in [0, 4294967295], got -5"),
        (["data", "prepare", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (["analyze", "penalty-correlation", "--beta_kl", "-1"], "--beta_kl must be > 0, got -1.0"),
        (["analyze", "apps", "--workers", "0"], "--workers must be >= 1, got 0"),
    ],
)
def test_out_of_range_numbers_name_their_option(argv, message, capsys):
    command = " ".join(argv[:2] if argv[0] in ("data", "analyze") else argv[:1])
    assert run_error(argv, capsys) == f"otalign {command}: error: {message}"


def test_data_synth_gives_a_reward_function_its_columns_and_names_a_missing_one(tmp_path, capsys, monkeypatch):
    from otalign.demos.synth import SynthConfig, run
    from otalign.models.tiny import save_tiny_model
    from otalign.rewards import REWARD_FUNCTIONS

    model = str(save_tiny_model(tmp_path / "tiny"))
    capsys.readouterr()  # the save's progress bar
    argv = ["data", "synth", "--reward_fn", "arithmetic", "--model_name_or_path", model, "--num_samples", "2"]
    line = run_error([*argv, "--output", str(tmp_path / "s.jsonl")], capsys)
    assert line.startswith("otalign data synth: error: reward function 'arithmetic' needs column(s) ['answer']")

    prompts = tmp_path / "sums.jsonl"
    prompts.write_text('{"prompt": "what is 1 + 1 ?", "answer": "2"}\n{"prompt": "what is 2 + 2 ?", "answer": "4"}\n')
    calls = []

    def recording(prompts, responses, answer):
        calls.append(answer)
        return [float(len(r)) for r in responses]

    entry = dataclasses.replace(REWARD_FUNCTIONS.entries["arithmetic"], target=recording)
    monkeypatch.setitem(REWARD_FUNCTIONS.entries, "arithmetic", entry)
    config = SynthConfig(output=str(tmp_path / "s.jsonl"), model_name_or_path=model, prompts=str(prompts))
    config.reward_fn = "arithmetic"
    with contextlib.suppress(ValueError):  # a tiny random model may tie on every prompt
        run(config)
    assert calls and all(answer == ["2", "4"] for answer in calls)
