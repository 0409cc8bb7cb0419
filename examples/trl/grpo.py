"""GRPO with an otalign regularizer (WPR's Wasserstein penalty by default) inside TRL, run like TRL's own
``trl/scripts/grpo.py``: every ``GRPOConfig``/``ModelConfig`` flag works, plus the ``OTAlignArguments`` below.

    python examples/trl/grpo.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward --beta 0.05 --regularizer wasserstein --penalty_in loss --wpr_top_k 16 \\
        --output_dir runs/grpo-wpr

(``accelerate launch examples/trl/grpo.py ...`` for several GPUs; ``--use_vllm`` as in TRL.) ``--beta`` is the
regularizer's coefficient.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

from _common import load_model, train_and_save, train_split
from trl import DatasetMixtureConfig, GRPOConfig, ModelConfig, ScriptArguments, TrlParser, get_peft_config


@dataclass
class GRPOScriptArguments(ScriptArguments):
    """TRL's script arguments plus the reward functions (names in ``trl.rewards`` or dotted import paths)."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy_reward"],
        metadata={"help": "reward functions: names in trl.rewards or dotted paths (my_module.my_reward)"},
    )


@dataclass
class OTAlignArguments:
    """otalign's own options."""

    regularizer: str = field(
        default="wasserstein", metadata={"help": "an otalign regularizer: wasserstein, kl, rkl, fkl, js, ..."}
    )
    penalty_in: str = field(default="loss", metadata={"help": "'loss' (support-gradient surrogate) or 'reward'"})
    wpr_top_k: int = field(default=16, metadata={"help": "wasserstein: top-k tokens of each side in the support"})
    wpr_lambda: float = field(default=100.0, metadata={"help": "wasserstein: entropic strength lambda"})


def reward_function(name: str):
    """``trl.rewards.<name>`` or the function at the dotted path ``name`` (importable from the working folder)."""
    import trl.rewards

    if hasattr(trl.rewards, name):
        return getattr(trl.rewards, name)
    if "." not in name:
        raise ValueError(f"--reward_funcs: {name!r} is neither in trl.rewards nor a dotted import path")
    module, attribute = name.rsplit(".", 1)
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), attribute)


def main(script_args, training_args, model_args, dataset_args, otalign_args) -> None:
    from otalign.integrations.trl import WPRGRPOTrainer
    from otalign.regularizers import build_regularizer, embedding_matrix

    model = load_model(model_args, training_args)
    options = {}
    if otalign_args.regularizer == "wasserstein":
        embeddings = embedding_matrix(model).float()  # the reference's: the policy starts from it
        options = {"embeddings": embeddings, "top_k": otalign_args.wpr_top_k, "lam": otalign_args.wpr_lambda}
    trainer = WPRGRPOTrainer(
        model,
        reward_funcs=[reward_function(name) for name in script_args.reward_funcs],
        args=training_args,
        train_dataset=train_split(script_args, dataset_args),
        peft_config=get_peft_config(model_args),
        regularizer=build_regularizer(otalign_args.regularizer, **options),
        penalty_in=otalign_args.penalty_in,
    )
    train_and_save(trainer, training_args)


if __name__ == "__main__":
    parser = TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig, DatasetMixtureConfig, OTAlignArguments))
    main(*parser.parse_args_and_config())
