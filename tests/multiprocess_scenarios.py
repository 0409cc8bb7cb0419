"""Training runs that must give the same numbers on 2 processes (``b`` examples each) as on 1 (``2b``).

Shared by the 2-process worker (launched with ``accelerate launch``, see ``test_multiprocess.py``) and the
1-process reference runs of the tests. Every run records, per process: the gradient that reached the
optimizer at its first step (after the data-parallel average and clipping), the parameters after training,
and every path under the results folder that the process wrote to (Python audit events), so the tests can
check loss, gradients, metrics, and that only the main process writes files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from otalign.data.preference import load_preference_data
from otalign.data.sft import load_sft_data
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"

# name: (trainer, per-process batch b on 2 processes, settings). The 1-process run takes 2b per step.
SCENARIOS: dict[str, tuple[str, int, dict]] = {
    # 5 pairs, 4 per step: the epoch's last batch has one pair and is completed from the next epoch's order.
    "dpo_sigmoid": ("dpo", 2, dict(loss_type="sigmoid", rows="pairs5", gradient_accumulation_steps=2, save_steps=1)),
    "aot_paired": ("dpo", 2, dict(loss_type="aot", rows="pairs", gradient_accumulation_steps=2)),
    "aot_unpaired": ("dpo", 4, dict(loss_type="aot_unpaired", rows="unpaired16", gradient_accumulation_steps=2)),
    "kto": ("dpo", 4, dict(loss_type="kto", rows="unpaired16", gradient_accumulation_steps=2)),
    "sft": ("sft", 2, dict(rows="sft5", gradient_accumulation_steps=2, save_steps=1)),
    # one example for two processes: neither process's share of the data is empty.
    "sft_one_example": ("sft", 1, dict(rows="sft1")),
    "reward": ("reward", 2, dict(gradient_accumulation_steps=2, eval_split_size=0.25)),
    "ppo": ("ppo", 2, dict(gradient_accumulation_steps=2, regularizer="wasserstein", save_steps=1)),
    # groups of 2 never cross processes; the adaptive beta moves every step and is checkpointed.
    "grpo": (
        "grpo",
        2,
        dict(
            gradient_accumulation_steps=2,
            regularizer="wasserstein",
            loss_type="dapo",
            beta=0.5,
            beta_target=0.01,
            beta_horizon=10.0,
            save_steps=1,
        ),
    ),
    # (num_mini_batches > 1 would not match: each process shuffles its own rollouts into mini-batches, as TRL)
    "rloo": ("rloo", 2, dict(gradient_accumulation_steps=2, regularizer="kl", penalty_in="reward", beta=0.5)),
}
MAX_STEPS = 3
RESUME_FROM = 1
"""Checkpointing scenarios are also resumed from ``checkpoint-1`` (by 2 processes in the worker, by 1 in the tests)."""
RESUMED = [name for name, (_, _, settings) in SCENARIOS.items() if settings.get("save_steps")]


def rows(name: str) -> list:
    """The training rows called ``name`` (fixture files or parts of them)."""
    if name.startswith("pairs"):
        pairs = load_preference_data(str(FIXTURES / "preference_pairs.jsonl"))
        return pairs[: int(name[5:] or len(pairs))]
    if name == "unpaired16":  # 8 desirable and 8 undesirable: every batch size splits them in the same proportion
        data = load_preference_data(str(FIXTURES / "preference_unpaired.jsonl"))
        return [e for e in data if e.label][:8] + [e for e in data if not e.label][:8]
    if name.startswith("sft"):
        return load_sft_data(str(FIXTURES / "sft_pairs.jsonl"))[: int(name[3:])]
    raise KeyError(name)


def build(name: str, output_dir: Path, *, processes: int, policy_seed: int = 0, **overrides):
    """The trainer of scenario ``name`` for a run on ``processes`` processes, writing to ``output_dir``."""
    kind, b, settings = SCENARIOS[name]
    settings = dict(settings)
    data = rows(settings.pop("rows")) if "rows" in settings else None
    common = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=b * 2 // processes,
        learning_rate=3e-3,
        progress_bar=False,
        save_model=False,
        save_total_limit=None,
    )
    common.update(settings)
    common.update(overrides)
    tokenizer = tiny_tokenizer()
    policy = tiny_causal_lm(tokenizer, seed=policy_seed)
    if kind == "dpo":
        from otalign.trainers import PreferenceConfig, PreferenceTrainer

        ref = tiny_causal_lm(tokenizer, seed=0)
        config = PreferenceConfig(**common)
        return PreferenceTrainer(config, policy=policy, ref_model=ref, tokenizer=tokenizer, train_data=data)
    if kind == "sft":
        from otalign.trainers.sft import SFTConfig, SFTTrainer

        return SFTTrainer(SFTConfig(**common), model=policy, tokenizer=tokenizer, train_data=data)
    if kind == "reward":
        from otalign.trainers.reward import RewardConfig, RewardTrainer

        pairs = load_preference_data(str(FIXTURES / "preference_pairs.jsonl"))
        return RewardTrainer(RewardConfig(**common), model=policy, tokenizer=tokenizer, train_data=pairs)
    if kind == "ppo":
        sys.path.insert(0, str(TESTS))
        from test_ppo import PROMPTS, good_share

        from otalign.trainers import PPOConfig, PPOTrainer

        config = PPOConfig(response_length=6, wpr_top_k=8, **{**common, "learning_rate": 1e-3})
        ref = tiny_causal_lm(tokenizer, seed=0)
        return PPOTrainer(config, policy=policy, ref_model=ref, tokenizer=tokenizer, reward=good_share, prompts=PROMPTS)
    if kind in ("grpo", "rloo"):
        sys.path.insert(0, str(TESTS))
        from test_critic_free import PROMPTS, characters

        from otalign.trainers import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
        config = config_cls(response_length=5, wpr_top_k=8, num_generations=2, **{**common, "learning_rate": 1e-3})
        ref = tiny_causal_lm(tokenizer, seed=0)
        models = dict(policy=policy, ref_model=ref, tokenizer=tokenizer)
        return trainer_cls(config, **models, reward=characters, prompts=PROMPTS)
    raise KeyError(kind)


class FirstStepGradients:
    """Records the flattened float64 gradients that the first optimizer step of a run sees (every optimizer)."""

    def __init__(self) -> None:
        self.grads: torch.Tensor | None = None
        self.handle = register_optimizer_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if self.grads is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.grads = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten() for p in params]
            )

    def close(self) -> None:
        self.handle.remove()


class WriteAudit:
    """Paths under ``root`` that this process opens for writing, creates, renames or removes (audit events)."""

    EVENTS = ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.events: list[tuple[str, str]] = []
        self.active = True
        sys.addaudithook(self._hook)  # audit hooks cannot be removed: ``active`` switches it off

    def _hook(self, event: str, args) -> None:
        if not self.active or event not in self.EVENTS or not args:
            return
        if event == "open":
            path, mode, flags = args
            if not (any(c in mode for c in "wax+") if isinstance(mode, str) else (flags or 0) & self.WRITE_FLAGS):
                return
        else:
            path = args[0]
        if isinstance(path, int) or path is None:
            return
        path = os.path.realpath(os.fsdecode(path))
        if path.startswith(self.root + os.sep):
            self.events.append((event, os.path.relpath(path, self.root)))


def run(name: str, output_dir: Path, *, processes: int, **overrides) -> dict:
    """Train scenario ``name``; returns ``{"grads", "params"}`` of this process (float64, flattened)."""
    recorder = FirstStepGradients()
    try:
        trainer = build(name, output_dir, processes=processes, **overrides)
        trainer.train()
    finally:
        recorder.close()
    model = trainer.accelerator.unwrap_model(trainer.policy)
    params = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return {"grads": recorder.grads, "params": params}


def main(root: str) -> None:
    """The 2-process worker: every scenario, then the resumed runs; ``results-<rank>.pt`` under ``root``."""
    import accelerate.state

    torch.set_num_threads(1)
    root = Path(root)
    audit = WriteAudit(root)
    results = {}
    for name in SCENARIOS:
        results[name] = run(name, root / name, processes=2)
    for name in RESUMED:
        checkpoint = root / name / "checkpoints" / f"checkpoint-{RESUME_FROM}"
        results[name + "_resumed"] = run(
            name, root / f"{name}_resumed", processes=2, policy_seed=5, resume_from_checkpoint=str(checkpoint)
        )
    audit.active = False
    rank = accelerate.state.PartialState().process_index
    results["writes"] = audit.events
    torch.save(results, root / f"results-{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
