"""OTPODPOTrainer: TRL's DPO loss with OTPO token weights equals otalign's own weighted DPO loss and gradients on a
tiny model (same batch, same weights), with a separate reference and with PEFT; bad settings are refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import DPOConfig  # noqa: E402

from otalign.integrations.trl import OTPODPOTrainer  # noqa: E402
from otalign.losses import PREFERENCE_LOSSES, call_loss, otpo_weights, sequence_logps  # noqa: E402
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402

PAIRS = [
    ("the cat", " sat on the mat", " ran"),
    ("a dog", " is here", " was not there at all"),
    ("the big", " red ball", " blue"),
]


def dataset():
    return datasets.Dataset.from_dict(
        {"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS], "rejected": [r for _, _, r in PAIRS]}
    )


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(PAIRS),
        max_steps=1,
        learning_rate=0.0,
        report_to=[],
        beta=0.1,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    values.update(overrides)
    return DPOConfig(**values)


def trainer(tmp_path, *, peft=False, **overrides):
    tokenizer = tiny_tokenizer()
    policy = tiny_causal_lm(tokenizer, seed=0)
    ref = None
    kwargs = {}
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
    else:
        ref = tiny_causal_lm(tokenizer, seed=1)
        with torch.no_grad():  # the policy moved away from the reference, so the log-ratios are not 0
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return OTPODPOTrainer(
        policy, ref, args=config(tmp_path, **overrides), train_dataset=dataset(), processing_class=tokenizer, **kwargs
    )


def first_batch(t):
    batch = next(iter(t.get_train_dataloader()))
    return {k: v.to(t.accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def oracle_logps(model, batch, *, hidden: bool):
    """(2n, T) per-token log-probs of the predicted tokens from full logits, and the last hidden states."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    states = out.hidden_states[-1][:, :-1].detach() if hidden else None
    return logp, states


def oracle_loss(policy, reference, batch, beta):
    """otalign's own DPO (sigmoid) loss with OTPO weights, as ``otalign dpo --token_weighting otpo`` computes it."""
    mask = batch["completion_mask"][:, 1:].bool()
    logp, states = oracle_logps(policy, batch, hidden=True)
    with torch.no_grad():
        ref_logp, _ = oracle_logps(reference, batch, hidden=False)
    n = mask.shape[0] // 2
    chosen, rejected = otpo_weights(states[:n], states[n:], mask[:n], mask[n:])
    weights = torch.cat([chosen, rejected])
    loss = PREFERENCE_LOSSES.build("sigmoid", beta=beta)
    labels = torch.arange(2 * n) < n
    out = call_loss(
        loss,
        sequence_logps(logp, mask, weights),
        sequence_logps(ref_logp, mask, weights),
        labels,
        pairs=n,
        lengths=mask.sum(1),
        beta=beta,
    )
    return out.loss


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("peft", [False, True], ids=["ref-model", "peft"])
def test_loss_and_gradients_equal_otalign_weighted_dpo(tmp_path, peft):
    t = trainer(tmp_path, peft=peft)
    batch = first_batch(t)
    model = t.model
    model.train()
    loss = t.compute_loss(model, batch)
    loss.backward()
    got = grads(model)
    model.zero_grad()

    reference = _Adapterless(model) if peft else t.ref_model
    expected = oracle_loss(model, reference, batch, t.beta)
    expected.backward()
    want = grads(model)
    assert float(expected) > 0
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    # the weights matter: TRL's unweighted loss differs
    plain = tiny_plain_loss(t, batch)
    assert abs(plain - float(loss)) > 1e-4


class _Adapterless(torch.nn.Module):
    """The PEFT model with its adapters disabled: the reference under PEFT."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        with self.model.disable_adapter():
            return self.model(**kwargs)


def tiny_plain_loss(t, batch) -> float:
    """TRL's own DPOTrainer loss on the same batch (no OTPO weights)."""
    from trl import DPOTrainer

    with torch.no_grad():
        return float(DPOTrainer._compute_loss(t, t.model, batch, False))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
        ({"ld_alpha": 0.5}, "ld_alpha"),
        ({"use_weighting": True}, "use_weighting"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}, "sft"),
    ],
)
def test_settings_that_would_be_silently_wrong_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, **overrides)


def test_two_training_steps_through_trainer_train(tmp_path):
    t = trainer(tmp_path, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    assert any(not torch.equal(p, before[n]) for n, p in t.model.named_parameters())
    losses = [entry["loss"] for entry in t.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
