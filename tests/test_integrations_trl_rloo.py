"""WPRRLOOTrainer: with ``kl`` it is TRL's own RLOOTrainer (same seed: same completions, advantages, loss and
gradients); with ``wasserstein`` its advantages differ from TRL's exactly by the leave-one-out map of
``-beta * (sum of penalties - sum of log-ratios)``, the penalties computed from full logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import RLOOConfig, RLOOTrainer  # noqa: E402
from trl_parity.parity import tiny_models  # noqa: E402

from otalign.integrations.trl import WPRRLOOTrainer  # noqa: E402
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from otalign.regularizers import build_regularizer  # noqa: E402

PROMPTS = ["the cat", "a dog is", "we are in the", "it was"]
BETA = 0.2
GENERATIONS = 4


def reward_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def build(cls, folder, regularizer=None, **overrides):
    from transformers import AutoModelForCausalLM

    tokenizer, _, ref, path = tiny_models(folder)  # TRL builds its reference model from the policy's path
    policy = AutoModelForCausalLM.from_pretrained(path)
    values = dict(
        output_dir=str(folder),
        per_device_train_batch_size=4,
        num_generations=GENERATIONS,
        max_completion_length=6,
        max_steps=1,
        learning_rate=0.0,
        beta=BETA,
        temperature=0.9,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
    )
    values.update(overrides)
    kwargs = {"regularizer": regularizer} if cls is WPRRLOOTrainer else {}
    trainer = cls(
        policy,
        reward_funcs=reward_length,
        args=RLOOConfig(**values),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        **kwargs,
    )
    trainer.ref_model.load_state_dict(ref)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which these tests stand in for
    return trainer


def generate(trainer):
    generation = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(1234)
    return trainer._generate_and_score_completions(generation)


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_kl_equals_trl_rloo_trainer(tmp_path):
    ours = build(WPRRLOOTrainer, tmp_path / "ours", build_regularizer("kl"))
    theirs = build(RLOOTrainer, tmp_path / "theirs")
    inputs, inputs_trl = generate(ours), generate(theirs)
    assert torch.equal(inputs["completion_ids"], inputs_trl["completion_ids"])
    torch.testing.assert_close(inputs["advantages"], inputs_trl["advantages"], atol=1e-5, rtol=1e-5)
    (loss, grads), (loss_trl, grads_trl) = loss_and_grads(ours, inputs), loss_and_grads(theirs, inputs_trl)
    torch.testing.assert_close(loss, loss_trl, atol=1e-6, rtol=1e-5)
    for name in grads_trl:
        torch.testing.assert_close(grads[name], grads_trl[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ours._metrics["train"]["kl"][-1] == pytest.approx(theirs._metrics["train"]["kl"][-1], abs=1e-6)
    assert abs(theirs._metrics["train"]["kl"][-1]) > 1e-3


def test_wasserstein_penalty_replaces_the_log_ratio_in_the_reward(tmp_path):
    tokenizer = tiny_tokenizer()
    embeddings = tiny_causal_lm(tokenizer, seed=1).get_input_embeddings().weight.detach()
    regularizer = build_regularizer("wasserstein", embeddings=embeddings, top_k=8)
    ours = build(WPRRLOOTrainer, tmp_path / "ours", regularizer)
    theirs = build(RLOOTrainer, tmp_path / "theirs")
    inputs, inputs_trl = generate(ours), generate(theirs)
    assert torch.equal(inputs["completion_ids"], inputs_trl["completion_ids"])

    mask = inputs["completion_mask"].bool()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    steps = mask.shape[1]
    with torch.no_grad():
        policy, ref = (
            m(input_ids=ids, attention_mask=attention).logits[:, -steps - 1 : -1] / ours.temperature
            for m in (ours.model, ours.ref_model)
        )
    penalty = regularizer.penalty(policy, ref, inputs["completion_ids"], mask).per_token.sum(1)
    log_ratio = build_regularizer("kl").penalty(policy, ref, inputs["completion_ids"], mask).per_token.sum(1)
    shift = (-BETA * (penalty - log_ratio)).view(-1, GENERATIONS)
    leave_one_out = (shift - (shift.sum(1, keepdim=True) - shift) / (GENERATIONS - 1)).flatten()
    torch.testing.assert_close(inputs["advantages"] - inputs_trl["advantages"], leave_one_out, atol=1e-5, rtol=1e-4)
    assert float(leave_one_out.abs().max()) > 1e-3
    assert ours._metrics["train"]["wasserstein/value"]


def test_beta_zero_is_refused(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        build(WPRRLOOTrainer, tmp_path, build_regularizer("kl"), beta=0.0)
