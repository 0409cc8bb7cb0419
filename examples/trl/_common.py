"""What the two TRL example scripts share: the training split, the model (float32 unless ``--dtype`` says
otherwise) and the final save, as TRL's own ``trl/scripts/*.py`` do them."""

from __future__ import annotations


def train_split(script_args, dataset_args):
    """The training split named by TRL's ``--dataset_name`` (a Hub id or a local folder of json/parquet files) or
    by a ``--datasets`` mixture."""
    from datasets import load_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    else:
        raise ValueError("Either --datasets or --dataset_name must be provided.")
    return dataset[script_args.dataset_train_split]


def load_model(model_args, training_args):
    """The causal LM at ``--model_name_or_path`` (loaded here, not by TRL, because the Wasserstein penalty needs
    the reference's token embeddings before the trainer exists)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    return AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
    )


def train_and_save(trainer, training_args) -> None:
    """``trainer.train()``, then the model saved to ``--output_dir``."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
