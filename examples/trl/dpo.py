"""DPO with OTPO token weights inside TRL, run like TRL's own ``trl/scripts/dpo.py``: every
``DPOConfig``/``ModelConfig`` flag works, plus the ``OTAlignArguments`` below.

    python examples/trl/dpo.py \\
        --model_name_or_path Qwen/Qwen2-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized \\
        --beta 0.1 --otpo_eps1 1.0 --otpo_eps2 0.2 --output_dir runs/dpo-otpo
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _common import load_model, train_and_save, train_split
from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments, TrlParser, get_peft_config


@dataclass
class OTAlignArguments:
    """OTPO's two constants (as ``otalign dpo --otpo_eps1 --otpo_eps2``)."""

    otpo_eps1: float = field(default=1.0, metadata={"help": "entropic regularization of the OTPO plan (> 0)"})
    otpo_eps2: float = field(default=0.2, metadata={"help": "marginal relaxation of the OTPO plan (> 0)"})


def main(script_args, training_args, model_args, dataset_args, otalign_args) -> None:
    from otalign.integrations.trl import OTPODPOTrainer

    trainer = OTPODPOTrainer(
        load_model(model_args, training_args),
        args=training_args,
        train_dataset=train_split(script_args, dataset_args),
        peft_config=get_peft_config(model_args),
        otpo_eps1=otalign_args.otpo_eps1,
        otpo_eps2=otalign_args.otpo_eps2,
    )
    train_and_save(trainer, training_args)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig, OTAlignArguments))
    main(*parser.parse_args_and_config())
