"""With LoRA and no reference given, the reference is the policy's base with its adapters disabled (as TRL): the
same numbers as a separate frozen copy, without the copy's weights."""

from __future__ import annotations

import pytest
import torch

from otalign.models import AdapterDisabled
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import PPOConfig, PPOTrainer, PreferenceConfig, PreferenceTrainer

pytestmark = [pytest.mark.usefixtures("torch_single_thread")]
peft = pytest.importorskip("peft")

LORA = dict(use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"], learning_rate=3e-3, max_steps=3)
COMMON = dict(progress_bar=False, save_model=False, per_device_train_batch_size=4, **LORA)


def non_timing(history):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


def dpo(tmp_path, **given):
    from test_preference_trainer import PAIRS

    config = PreferenceConfig(output_dir=str(tmp_path), dataset_name=PAIRS, **COMMON)
    tokenizer = tiny_tokenizer()
    return PreferenceTrainer(config, policy=tiny_causal_lm(tokenizer, seed=0), tokenizer=tokenizer, **given)


def ppo(tmp_path, **given):
    from test_ppo import PROMPTS, good_share

    config = PPOConfig(output_dir=str(tmp_path), response_length=5, regularizer="wasserstein", wpr_top_k=8, **COMMON)
    tokenizer = tiny_tokenizer()
    policy = tiny_causal_lm(tokenizer, seed=0)
    return PPOTrainer(config, policy=policy, tokenizer=tokenizer, reward=good_share, prompts=PROMPTS, **given)


@pytest.mark.parametrize("build", [dpo, ppo], ids=["dpo", "ppo"])
def test_adapters_disabled_reference_equals_a_frozen_copy_and_shares_the_weights(build, tmp_path):
    shared = build(tmp_path / "shared")
    assert isinstance(shared.ref_model, AdapterDisabled)
    policy = shared.accelerator.unwrap_model(shared.policy)
    assert shared.ref_model.peft_model is policy  # no second copy of the weights
    copy = build(tmp_path / "copy", ref_model=tiny_causal_lm(tiny_tokenizer(), seed=0))
    assert not isinstance(copy.ref_model, AdapterDisabled)

    history = shared.train()
    assert non_timing(history) == non_timing(copy.train())
    assert history[-1]["kl/exact" if build is ppo else "rewards/margins"] != 0  # the policy moved off the reference
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)  # .eval()/.to() left them


def test_adapter_disabled_reference_is_the_base_model_after_training(tmp_path):
    trainer = dpo(tmp_path)
    trainer.train()
    ids = torch.tensor([[3, 5, 7, 9]])
    base = tiny_causal_lm(tiny_tokenizer(), seed=0).eval()
    torch.testing.assert_close(trainer.ref_model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(TypeError, match="needs a peft model"):
        AdapterDisabled(base)
