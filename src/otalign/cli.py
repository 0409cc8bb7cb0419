"""Command-line entry point: ``otalign <command> [--config FILE] [--field value ...]``.

Every command is one row of :data:`COMMANDS`: its name, one line of help, its config dataclass and what runs it.
The options of a command are the fields of its config (:class:`otalign.config.ConfigParser`: ``--help`` lists each
with type, default, choices and help), read from ``--config file.yaml`` and then the command line. Adding a command
is adding a row; its logic stays in the library.

Every user error (missing or unreadable file, bad YAML, unknown key, wrong type, invalid value, a bad data row)
ends in one line ``otalign <command>: error: ...`` on stderr and exit status 2; ``OTALIGN_DEBUG=1`` re-raises
it with its traceback instead.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass

USER_ERRORS = (ValueError, OSError, ImportError)
"""Exceptions reported as one line: config and data problems (``ConfigError``, ``RowError`` and the loaders'
``ValueError``), files (``OSError``) and missing optional packages (``ImportError``)."""


@dataclass(frozen=True)
class Command:
    """One command of the table.

    Attributes:
        name: what the user types after ``otalign`` (``"data synth"`` for an action of a group).
        help: one line for ``otalign --help``.
        config: ``"module:ConfigClass"``, the dataclass whose fields are the options.
        run: ``"module:function"`` called with the config, or ``"module:Class().method"``: ``Class(config).method()``.
            An ``int`` result is the exit status.
        example: options shown in the command's ``--help`` as an example.
    """

    name: str
    help: str
    config: str
    run: str
    example: str = ""

    def config_class(self) -> type:
        from otalign.registry import resolve

        return resolve(self.config)

    def execute(self, config) -> object:
        from otalign.registry import resolve

        target, construct, method = self.run.partition("().")
        if construct:
            return getattr(resolve(target)(config), method)()
        return resolve(target)(config)


@dataclass(frozen=True)
class Group:
    """A command whose actions come from a registry (``otalign analyze <kind>``): each entry's ``target`` runs the
    config, its ``config`` setting is the config class, its help the action's.

    Attributes:
        registry: ``"module:NAME"`` of the registry.
        imports: modules that register further actions from a layer above the registry's (imported first).
    """

    name: str
    help: str
    registry: str
    imports: tuple[str, ...] = ()

    def commands(self) -> list[Command]:
        from otalign.registry import resolve

        for module in self.imports:
            importlib.import_module(module)
        registry = resolve(self.registry)
        return [
            Command(f"{self.name} {entry.name}", entry.help, _spec(entry.info["config"]), _spec(entry.resolve()))
            for entry in registry.entries.values()
        ]


def _spec(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


COMMANDS: tuple[Command | Group, ...] = (
    Command(
        "ppo",
        "RLHF with PPO and a pluggable regularizer (kl, fkl, js, alpha, tv, chi2, wasserstein)",
        "otalign.trainers.ppo:PPOConfig",
        "otalign.trainers.ppo:PPOTrainer().train",
        "--regularizer wasserstein --beta 0.05 --max_steps 200 --resume",
    ),
    Command(
        "grpo",
        "critic-free RL: group-normalised advantages (GRPO, Dr. GRPO), any regularizer in the reward or the loss",
        "otalign.trainers.critic_free:GRPOConfig",
        "otalign.trainers.critic_free:GRPOTrainer().train",
        "--reward_fn arithmetic --prompts arithmetic --num_generations 4 --regularizer wasserstein",
    ),
    Command(
        "rloo",
        "critic-free RL with the leave-one-out baseline (RLOO), any regularizer in the reward or the loss",
        "otalign.trainers.critic_free:RLOOConfig",
        "otalign.trainers.critic_free:RLOOTrainer().train",
        "--reward_fn arithmetic --prompts arithmetic --num_generations 4 --regularizer rkl",
    ),
    Command(
        "dpo",
        "preference optimization: DPO, IPO, hinge, AOT (paired/unpaired), KTO; optional OTPO token weights",
        "otalign.trainers.preference:PreferenceConfig",
        "otalign.trainers.preference:PreferenceTrainer().train",
        "--dataset_name pairs.jsonl --loss_type aot --token_weighting otpo",
    ),
    Command(
        "sft",
        "supervised fine-tuning on prompt/completion pairs or conversations (loss on responses only)",
        "otalign.trainers.sft:SFTConfig",
        "otalign.trainers.sft:SFTTrainer().train",
        "--dataset_name sft.jsonl --packing --use_peft --eval_dataset_name held_out.jsonl",
    ),
    Command(
        "reward",
        "Bradley-Terry reward model on prompt/chosen/rejected pairs (a sequence-classification checkpoint)",
        "otalign.trainers.reward:RewardConfig",
        "otalign.trainers.reward:RewardTrainer().train",
        "--model_name_or_path runs/sft/model --dataset_name pairs.jsonl --eval_split_size 0.1",
    ),
    Command(
        "eval",
        "pairwise win rates of two or more models or generation files (reward, chat-model or HTTP judge)",
        "otalign.eval.config:EvalConfig",
        "otalign.eval.run:run_eval",
        "--models a,b --judge http --judge_base_url http://127.0.0.1:8000/v1 --num_prompts 50",
    ),
    Group(
        "analyze",
        "the WPR paper's analyses as JSON + PNG (otalign analyze --help lists them)",
        "otalign.eval.analysis:ANALYSES",
        imports=("otalign.sweep.beta",),
    ),
    Command(
        "sweep",
        "a grid of ppo/dpo runs x seeds, one shared held-out evaluation, frontiers and intervals (resumable)",
        "otalign.sweep.config:SweepConfig",
        "otalign.sweep.run:run_sweep",
        "--config sweep.yaml --aggregate-only",
    ),
    Command(
        "pipeline",
        "sft -> reward -> ppo -> eval from one config, each stage feeding the next, completed stages skipped",
        "otalign.pipeline:PipelineConfig",
        "otalign.pipeline:Pipeline().run",
        "--dataset pairs.jsonl --sft.max_steps 100 --ppo.regularizer wasserstein",
    ),
    Command(
        "data synth",
        "synthetic preference pairs from a model and a reward function",
        "otalign.demos.synth:SynthConfig",
        "otalign.demos.synth:run",
        "--num_samples 4 --output pairs.jsonl",
    ),
    Command(
        "data prepare",
        "convert a dataset (preference, hh-rlhf, tldr) and split it 20/40/40 into the stages' files",
        "otalign.data.splits:PrepareConfig",
        "otalign.data.splits:PrepareConfig.run",
        "--dataset hh.jsonl --dataset_format hh-rlhf --output_dir data/prepared",
    ),
    Command(
        "demo",
        "the main job: WPR vs RKL PPO on the default model, evaluated on held-out prompts",
        "otalign.demos.ppo_demo:DemoConfig",
        "otalign.demos.ppo_demo:main",
        "--max_steps 8 --out reports/demo",
    ),
    Command(
        "token-geometry",
        "the WPR paper's Figure 1 example (KL/JS vs OT)",
        "otalign.demos.token_geometry:TokenGeometryConfig",
        "otalign.demos.token_geometry:main",
        "--eps 0.01",
    ),
)
"""The commands, in ``otalign --help`` order."""


class UsageError(Exception):
    """An unknown command or action."""


@dataclass(frozen=True)
class Listing:
    """``otalign GROUP --help`` of a command with actions (``data``, ``analyze``): its actions, one line each."""

    name: str
    help: str
    actions: tuple[Command, ...]

    def text(self) -> str:
        width = max(len(a.name) for a in self.actions) + 2
        rows = "\n".join(f"  {a.name:<{width}}{a.help}" for a in self.actions)
        return f"usage: otalign {self.name} ACTION [--config FILE] [--field value ...]\n\n{self.help}\n\n{rows}"


def _top_help() -> str:
    from otalign import __version__

    lines = [
        "usage: otalign COMMAND [--config FILE] [--field value ...]",
        "",
        f"Align language models with optimal transport (otalign {__version__}).",
        "",
        "commands:",
    ]
    width = max(len(c.name) for c in COMMANDS) + 2
    lines += [f"  {c.name:<{width}}{c.help}" for c in COMMANDS]
    lines += ["", "otalign COMMAND --help lists the command's options; OTALIGN_DEBUG=1 shows tracebacks of errors."]
    return "\n".join(lines)


def find_command(argv: list[str]) -> tuple[Command | Listing, list[str]]:
    """The command ``argv`` starts with (one word, or a group and its action) and the remaining arguments; a group
    followed by ``-h``/``--help`` gives its :class:`Listing`.

    Raises:
        UsageError: an unknown command, or a group with no action or an unknown one.
    """
    names = [c.name for c in COMMANDS]
    word = argv[0]
    group = next((c for c in COMMANDS if isinstance(c, Group) and c.name == word), None)
    if group is not None:
        actions, kind = tuple(group.commands()), resolve_kind(group)
        help_ = group.help
    else:
        actions = tuple(c for c in COMMANDS if isinstance(c, Command) and c.name.startswith(f"{word} "))
        kind, help_ = "action", f"otalign {word} ACTION --help lists the action's options"
    if not actions:
        if word in names:
            return COMMANDS[names.index(word)], argv[1:]
        firsts = sorted({n.split(" ")[0] for n in names})
        raise UsageError(f"unknown command {word!r}; choose one of {firsts}{_mean(word, firsts)}")
    kinds = [a.name.split(" ", 1)[1] for a in actions]
    if len(argv) < 2:
        raise UsageError(f"missing {kind}; choose one of {kinds} (otalign {word} --help describes them)")
    if argv[1] in ("-h", "--help"):
        return Listing(word, help_, actions), argv[2:]
    for action in actions:
        if action.name == f"{word} {argv[1]}":
            return action, argv[2:]
    raise UsageError(f"unknown {kind} {argv[1]!r}; choose one of {kinds}{_mean(argv[1], kinds)}")


def resolve_kind(group: Group) -> str:
    from otalign.registry import resolve

    return resolve(group.registry).kind


def _mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _description(command: Command, cls: type) -> str:
    doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).replace("``", "")  # reStructuredText roles and literals
    example = f" Example: otalign {command.name} {command.example}" if command.example else ""
    return f"{command.help}. {doc}{example}"


def main(argv: list[str] | None = None) -> int:
    """Run ``otalign <argv>``; returns the exit status (user errors: one line on stderr, ``SystemExit(2)``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    if argv[0] == "--version":
        from otalign import __version__

        print(f"otalign {__version__}")
        return 0
    name = argv[0]
    try:
        command, rest = find_command(argv)
        name = command.name
        if isinstance(command, Listing):
            print(command.text())
            return 0
        from otalign.config import ConfigParser

        cls = command.config_class()
        parser = ConfigParser(cls, prog=f"otalign {command.name}", description=_description(command, cls))
        config = parser.parse(rest, validate=hasattr(cls, "validate"))
        result = command.execute(config)
    except (UsageError, *USER_ERRORS) as err:
        if os.environ.get("OTALIGN_DEBUG", "") not in ("", "0"):
            raise
        print(f"otalign {name}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
