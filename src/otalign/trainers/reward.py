r"""Bradley-Terry reward-model training on preference pairs: ``RewardConfig``, ``RewardTrainer``.

The model is a causal LM's backbone with a scalar head (:mod:`otalign.models.reward_head`); its reward
:math:`r(x, y)` is the head's logit at the last token of prompt + response. Loss per pair:
:math:`-\log\sigma(r(x, y^+) - r(x, y^-))`, plus ``center_rewards_coefficient`` times
:math:`(r(x, y^+) + r(x, y^-))^2` when set (TRL's reward centering). The trained model is saved as a
standard ``AutoModelForSequenceClassification`` checkpoint (LoRA adapters merged) with the tokenizer in
``output_dir/model``: the ``reward_model_name_or_path`` of ``otalign ppo``.

Data: paired ``prompt/chosen/rejected`` rows (:mod:`otalign.data.preference`), encoded like the DPO
trainer's (chat template for conversations, EOS after plain-text responses); a side longer than ``max_length``
is an error by default, or truncated by ``truncation_mode`` (:mod:`otalign.data.truncation`). The held-out pairs are
``eval_dataset_name``, or a seeded ``eval_split_size`` share of the training file. Metrics (TRL names):
``loss``, ``accuracy`` (share of pairs with :math:`r^+ > r^-`), ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins`` (mean :math:`r^+ - r^-`), and the same with the prefix ``eval_`` for the held-out pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from otalign.data.preference import PreferencePair, encode, load_preference_data
from otalign.data.reading import numbered
from otalign.data.truncation import truncate_pair
from otalign.models import check_fits_context, load_tokenizer
from otalign.models.reward_head import load_reward_model, reward_model_from_causal_lm

from .config import ConfigError, redefault
from .dataset import DatasetConfig
from .metrics import EVAL_PREFIX, Timer
from .preference_batch import collate
from .supervised import SupervisedTrainer

Pair = tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]
"""An encoded pair: ((prompt_ids, chosen_ids), (prompt_ids, rejected_ids))."""


@dataclass
class RewardConfig(DatasetConfig):
    """Reward-model settings (TRL ``RewardConfig`` names): the dataset options of :class:`DatasetConfig`
    (``per_device_train_batch_size`` counts pairs); ``model_name_or_path`` is a causal LM (e.g. the SFT output)
    or a sequence-classification checkpoint."""

    output_dir: str = redefault(DatasetConfig, "output_dir", "runs/reward")
    learning_rate: float = redefault(DatasetConfig, "learning_rate", 1e-5)
    truncation_mode: str = redefault(DatasetConfig, "truncation_mode", "error")
    eval_split_size: float = field(
        default=0.0,
        metadata={
            "help": "share of the pairs held out for evaluation (instead of eval_dataset_name)",
            "check": "[0, 1)",
        },
    )
    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "weight of the mean squared summed pair reward (none: off)", "check": ">= 0"}
    )

    eval_data_fields: ClassVar[tuple[str, ...]] = ("eval_dataset_name", "eval_split_size")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_split_size and self.eval_dataset_name:
            raise ConfigError("set eval_dataset_name or eval_split_size, not both")


def held_out(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)`` into (train, held-out) indices, ``round(share * n)`` held out (at least one
    of each when ``share > 0``)."""
    if not share:
        return list(range(n)), []
    k = min(max(round(share * n), 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[k:]), sorted(order[:k])


def pair_rewards(model, pairs: list[Pair], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float32 rewards of the chosen and of the rejected responses of ``pairs`` (one forward pass)."""
    batch = collate([p[0] for p in pairs] + [p[1] for p in pairs], pad_token_id, device)
    scores = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), use_cache=False).logits
    scores = scores[:, 0].float()
    return scores[: len(pairs)], scores[len(pairs) :]


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """``accuracy``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` of (n,) pair rewards."""
    return {
        "accuracy": float((chosen > rejected).float().mean()),
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/margins": float((chosen - rejected).mean()),
    }


class RewardTrainer(SupervisedTrainer):
    """Trains a scalar reward model on preference pairs with the Bradley-Terry loss.

    Args:
        config: :class:`RewardConfig`.
        model: a sequence-classification model with one output, or a causal LM (its backbone gets a new
            scalar head); default from ``model_name_or_path``.
        tokenizer: its tokenizer.
        train_data, eval_data: :class:`~otalign.data.preference.PreferencePair` rows instead of the config's.
        accelerator: an existing ``accelerate.Accelerator``.

    Raises:
        ValueError: unpaired or bad rows (naming source, row and field), rows longer than ``max_length`` (with
            ``truncation_mode: error``) or the model's context: all before training.
    """

    progress_keys = ("loss", "accuracy", "rewards/margins")

    def __init__(
        self,
        config: RewardConfig,
        *,
        model=None,
        tokenizer=None,
        train_data: list[PreferencePair] | None = None,
        eval_data: list[PreferencePair] | None = None,
        accelerator=None,
    ) -> None:
        super().__init__(config, accelerator)
        c = config
        train_data, eval_data = self.load_datasets(train_data, eval_data, load_preference_data)
        self.tokenizer = tokenizer or load_tokenizer(c.model_name_or_path)
        pad = self.tokenizer.pad_token_id
        train_pairs = self._encode(train_data, c.dataset_name or "train_data")
        self.eval_pairs = self._encode(eval_data, c.eval_dataset_name or "eval_data") if eval_data else None
        if c.eval_split_size:
            train_ids, eval_ids = held_out(len(train_pairs), c.eval_split_size, c.seed)
            self.eval_pairs = [train_pairs[i] for i in eval_ids]
            train_pairs = [train_pairs[i] for i in train_ids]
        self.train_pairs = train_pairs
        self.plan_evaluation(bool(self.eval_pairs))  # eval_split_size of a single pair holds none out

        if model is None:
            model = load_reward_model(c.model_name_or_path, pad, **c.model_kwargs)
        elif type(model).__name__.endswith("ForCausalLM"):
            model = reward_model_from_causal_lm(model, pad)
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model has one output (num_labels=1), got {model.config.num_labels}")
        longest = max(len(p) + len(r) for pair in train_pairs + (self.eval_pairs or []) for p, r in pair)
        check_fits_context(model, longest, "a row", "lower max_length")
        self.count_examples(len(self.train_pairs))
        self.prepare_model(model, task_type="SEQ_CLS")

    def _encode(self, examples: list, source: str) -> list[Pair]:
        if not examples:
            raise ValueError(f"{source}: the dataset is empty")
        pairs = []
        for row, example in numbered(examples):
            where = f"{source}, row {row}"
            if not isinstance(example, PreferencePair):
                raise ValueError(f"{where}: reward training needs paired prompt/chosen/rejected rows")
            sides = []
            for side in ("chosen", "rejected"):
                prompt_ids, response_ids = encode(self.tokenizer, example.prompt, getattr(example, side), where)
                if not response_ids:
                    raise ValueError(f"{where}, field {side!r}: the response encodes to no tokens")
                c = self.config
                sides.append(
                    truncate_pair(prompt_ids, response_ids, c.max_length, c.truncation_mode, f"{where}, field {side!r}")
                )
            pairs.append(tuple(sides))
        return pairs

    def loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """Mean Bradley-Terry loss (nats) of (n,) pair rewards, plus the centering term when configured."""
        loss = -F.logsigmoid(chosen - rejected).mean()
        if self.config.center_rewards_coefficient:
            loss = loss + self.config.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        return loss

    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` steps (resuming if asked); returns the metrics of the steps run."""
        c, acc = self.config, self.accelerator
        history = []
        start = self.begin()
        self.print(
            f"reward model: {len(self.train_pairs)} training pairs, {len(self.eval_pairs or [])} held out, "
            f"{c.max_steps} steps x {c.step_batch_size * acc.num_processes} pairs, device={acc.device}"
        )
        for step in self.steps(start):
            timer = Timer(acc.device)
            micro = self.micro_batches(step, self.train_pairs)
            scores, loss_sum = [], 0.0
            for m, pairs in enumerate(micro):
                with self.no_sync(last=m == len(micro) - 1):
                    chosen, rejected = pair_rewards(self.policy, pairs, self.tokenizer.pad_token_id, acc.device)
                    loss = self.loss(chosen, rejected)
                    self.guard.watch("the loss", loss, self.divergence_cause())
                    timer.lap("forward")
                    acc.backward(loss / len(micro))
                    timer.lap("backward")
                loss_sum += float(loss.detach()) / len(micro)
                scores.append(torch.stack([chosen.detach(), rejected.detach()], dim=1))
            optimizer_metrics = self.optimizer_step(step)
            timer.lap("update")
            gathered = acc.gather(torch.cat(scores))
            metrics = {"loss": float(acc.reduce(torch.tensor(loss_sum, device=acc.device), "mean"))}
            metrics.update(pair_metrics(gathered[:, 0], gathered[:, 1]))
            metrics.update({**optimizer_metrics, **timer.metrics()})
            if self.evaluate_now(step):
                metrics.update(self.evaluate())
            history.append(metrics)
            self.end_step(step, metrics)
        return self.conclude(history)

    @torch.no_grad()
    def evaluate(self, pairs: list[Pair] | None = None) -> dict[str, float]:
        """``eval_loss``, ``eval_accuracy`` and ``eval_rewards/...`` on ``pairs`` (default: the held-out pairs).
        Every process evaluates all pairs."""
        pairs = self.eval_pairs if pairs is None else pairs
        model = self.accelerator.unwrap_model(self.policy)
        was_training = model.training
        model.eval()
        size = self.config.eval_batch_size
        chosen, rejected = [], []
        for s in range(0, len(pairs), size):
            c, r = pair_rewards(model, pairs[s : s + size], self.tokenizer.pad_token_id, self.accelerator.device)
            chosen.append(c)
            rejected.append(r)
        model.train(was_training)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        metrics = {"loss": float(self.loss(chosen, rejected)), **pair_metrics(chosen, rejected)}
        return {f"{EVAL_PREFIX}{k}": v for k, v in metrics.items()}
