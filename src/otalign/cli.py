"""Command-line entry point: ``otalign <command> [options]``.

Each command is a thin wrapper: parse arguments, build the objects, call the library. Commands backed by
a config dataclass (``ppo``, ``demo``) take ``--config file.yaml`` and ``--key value`` overrides that map
1:1 onto the dataclass fields (see :func:`otalign.trainers.parse_config`).
"""

from __future__ import annotations

import argparse
import sys


def _ppo(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.trainers import PPOConfig, PPOTrainer, parse_config

    config = parse_config(PPOConfig, args.config, rest)
    PPOTrainer(config).train()
    return 0


def _dpo(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.trainers import PreferenceConfig, PreferenceTrainer, parse_config

    config = parse_config(PreferenceConfig, args.config, rest)
    PreferenceTrainer(config).train()
    return 0


def _sft(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.trainers import parse_config
    from otalign.trainers.sft import SFTConfig, SFTTrainer

    SFTTrainer(parse_config(SFTConfig, args.config, rest)).train()
    return 0


def _reward(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.trainers import parse_config
    from otalign.trainers.reward import RewardConfig, RewardTrainer

    RewardTrainer(parse_config(RewardConfig, args.config, rest)).train()
    return 0


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.eval.config import EvalConfig
    from otalign.eval.run import run_eval
    from otalign.trainers import parse_config

    run_eval(parse_config(EvalConfig, args.config, rest))
    return 0


def _analyze(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.eval.analysis import ANALYSES
    from otalign.trainers import ConfigError, parse_config

    if args.kind not in ANALYSES:
        raise ConfigError(f"unknown analysis {args.kind!r}; choose one of {sorted(ANALYSES)}")
    config_cls, run = ANALYSES[args.kind]
    run(parse_config(config_cls, args.config, rest))
    return 0


def _sweep(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.sweep import parse_sweep_config, run_sweep

    run_sweep(parse_sweep_config(args.config, rest))
    return 0


def _pipeline(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.pipeline import Pipeline, parse_pipeline_config

    Pipeline(parse_pipeline_config(args.config, rest)).run()
    return 0


def _data(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.data.splits import PrepareConfig
    from otalign.demos.synth import SynthConfig, run
    from otalign.trainers import ConfigError, parse_config

    if args.action == "synth":
        run(parse_config(SynthConfig, args.config, rest))
    elif args.action == "prepare":
        parse_config(PrepareConfig, args.config, rest).run()
    else:
        raise ConfigError(f"unknown data action {args.action!r}; choose synth or prepare")
    return 0


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.demos import ppo_demo
    from otalign.trainers import parse_config

    return ppo_demo.main(parse_config(ppo_demo.DemoConfig, args.config, rest))


def _token_geometry(args: argparse.Namespace, rest: list[str]) -> int:
    from otalign.demos import token_geometry

    token_geometry.run(eps=args.eps, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from otalign import __version__

    parser = argparse.ArgumentParser(prog="otalign", description="Align language models with optimal transport.")
    parser.add_argument("--version", action="version", version=f"otalign {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ppo = commands.add_parser(
        "ppo",
        help="RLHF with PPO and a pluggable regularizer (kl, fkl, js, alpha, tv, chi2, wasserstein)",
        description="PPO. Options: --config file.yaml, then --<field> <value> for any PPOConfig field "
        "(e.g. --regularizer wasserstein --beta 0.05 --max_steps 200 --resume).",
    )
    ppo.add_argument("--config", help="YAML file with PPOConfig fields")
    ppo.set_defaults(handler=_ppo, takes_overrides=True)

    dpo = commands.add_parser(
        "dpo",
        help="preference optimization: DPO, IPO, hinge, AOT (paired/unpaired), KTO; optional OTPO token weights",
        description="Preference optimization. Options: --config file.yaml, then --<field> <value> for any "
        "PreferenceConfig field (e.g. --dataset_name pairs.jsonl --loss_type aot_paired --token_weighting otpo).",
    )
    dpo.add_argument("--config", help="YAML file with PreferenceConfig fields")
    dpo.set_defaults(handler=_dpo, takes_overrides=True)

    sft = commands.add_parser(
        "sft",
        help="supervised fine-tuning on prompt/completion pairs or conversations (loss on responses only)",
        description="SFT. Options: --config file.yaml, then --<field> <value> for any SFTConfig field "
        "(e.g. --dataset_name sft.jsonl --packing --use_peft --eval_dataset_name held_out.jsonl).",
    )
    sft.add_argument("--config", help="YAML file with SFTConfig fields")
    sft.set_defaults(handler=_sft, takes_overrides=True)

    reward = commands.add_parser(
        "reward",
        help="Bradley-Terry reward model on prompt/chosen/rejected pairs (a sequence-classification checkpoint)",
        description="Reward-model training. Options: --config file.yaml, then --<field> <value> for any "
        "RewardConfig field (e.g. --model_name_or_path runs/sft/model --dataset_name pairs.jsonl "
        "--eval_split_size 0.1).",
    )
    reward.add_argument("--config", help="YAML file with RewardConfig fields")
    reward.set_defaults(handler=_reward, takes_overrides=True)

    evaluate = commands.add_parser(
        "eval",
        help="pairwise win rates of two or more models or generation files, judged by a reward, a chat model or "
        "an OpenAI-compatible endpoint",
        description="Win rates (mean ± std over repeats, ties count half, answer order randomised). Options: "
        "--config file.yaml, then --<field> <value> for any EvalConfig field (e.g. --models a,b --judge http "
        "--judge_base_url http://127.0.0.1:8000/v1 --num_prompts 50 --num_repeats 5).",
    )
    evaluate.add_argument("--config", help="YAML file with EvalConfig fields")
    evaluate.set_defaults(handler=_eval, takes_overrides=True)

    analyze = commands.add_parser(
        "analyze",
        help="the WPR paper's analyses: penalty-correlation (KL vs Wasserstein), coherence (top-10 candidates), "
        "semantic-similarity (penalties vs answer similarity), beta-sweep (PPO over a beta grid)",
        description="Run one analysis; it writes JSON and a PNG plot to output_dir. Options: KIND, --config "
        "file.yaml, then --<field> <value> for any field of the analysis' config (e.g. penalty-correlation "
        "--run_dir runs/wpr, or --policy runs/wpr/model --reference default; coherence --models a,b).",
    )
    analyze.add_argument(
        "kind", metavar="KIND", help="penalty-correlation | coherence | semantic-similarity | beta-sweep"
    )
    analyze.add_argument("--config", help="YAML file with the analysis' config fields")
    analyze.set_defaults(handler=_analyze, takes_overrides=True)

    pipeline = commands.add_parser(
        "pipeline",
        help="sft -> reward -> ppo -> eval from one config, each stage feeding the next, completed stages skipped",
        description="The RLHF pipeline. Options: --config file.yaml, then --<field> <value> for any PipelineConfig "
        "field and --<stage>.<field> <value> for a stage's (e.g. --dataset pairs.jsonl --sft.max_steps 100 "
        "--ppo.regularizer wasserstein).",
    )
    pipeline.add_argument("--config", help="YAML file with PipelineConfig fields and per-stage sections")
    pipeline.set_defaults(handler=_pipeline, takes_overrides=True)

    sweep = commands.add_parser(
        "sweep",
        help="a grid of ppo/dpo runs x seeds, one shared held-out evaluation, frontiers and intervals (resumable)",
        description="Options: --config sweep.yaml, then --<field> <value> for any SweepConfig field "
        "(e.g. --aggregate-only, --num_eval_prompts 20).",
    )
    sweep.add_argument("--config", help="YAML file with SweepConfig fields")
    sweep.set_defaults(handler=_sweep, takes_overrides=True)

    data = commands.add_parser(
        "data",
        help="datasets: synth (preference pairs from a model and a reward), prepare (convert + 20/40/40 split)",
        description="ACTION synth: --<field> <value> for any SynthConfig field (model_name_or_path, prompts, "
        "num_samples, output, ...). ACTION prepare: --dataset FILE --dataset_format hh-rlhf|tldr|preference "
        "--output_dir DIR [--seed N --on_error skip].",
    )
    data.add_argument("action", metavar="ACTION", help="synth | prepare")
    data.add_argument("--config", help="YAML file with the action's config fields")
    data.set_defaults(handler=_data, takes_overrides=True)

    demo = commands.add_parser(
        "demo",
        help="the main job: WPR vs RKL PPO on the default model, evaluated on held-out prompts",
        description="Train WPR and RKL PPO briefly, evaluate both and the reference, write a report. "
        "Options: --config file.yaml, then --<field> <value> for any DemoConfig field "
        "(out, model_name_or_path, max_steps, batch_size, response_length, learning_rate, use_peft, ...).",
    )
    demo.add_argument("--config", help="YAML file with DemoConfig fields")
    demo.set_defaults(handler=_demo, takes_overrides=True)

    geometry = commands.add_parser("token-geometry", help="the WPR paper's Figure 1 example (KL/JS vs OT)")
    geometry.add_argument("--eps", type=float, default=0.01, help="entropic regularization (cost units)")
    geometry.add_argument("--out", default="reports/token-geometry", help="output directory")
    geometry.set_defaults(handler=_token_geometry, takes_overrides=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not args.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.handler(args, rest)
    except ValueError as err:  # config and input errors: one clear line, no traceback
        from otalign.trainers import ConfigError

        if isinstance(err, ConfigError):
            parser.exit(2, f"otalign {args.command}: error: {err}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
