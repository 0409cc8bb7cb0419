"""Supervised fine-tuning of a causal LM on response tokens (text rows: every token): ``SFTConfig``, ``SFTTrainer``.

Data (:mod:`otalign.data.sft`): ``prompt``/``completion`` rows, ``messages`` conversations or ``text`` rows (the
column ``dataset_text_field``; every token trained), each encoded to ``(input_ids, labels)`` with label ``-100`` on
prompt tokens (chat template applied to conversations; with ``completion_only_loss: false``, TRL's, a
prompt-completion row's prompt tokens are trained too), and cut to ``max_length`` tokens by ``truncation_mode``
(:mod:`otalign.data.truncation`; TRL's default ``keep_start``).
With ``packing`` the encoded examples are concatenated, in a seeded order, into one token stream cut into
rows of exactly ``max_length`` tokens (examples may span two rows; attention is not blocked between
examples). Each step every process takes ``per_device_train_batch_size`` rows (examples, or packed
rows) from seeded per-epoch permutations; the position in the data follows from the step, so a resumed
run continues exactly where it stopped.

Loss: mean cross-entropy (float32, nats per token) over the trained tokens of the step. Metrics with TRL's
names: ``loss``, ``num_tokens`` (input tokens, prompts included, seen so far by all processes),
``mean_token_accuracy`` (share of the trained tokens the logits' argmax predicts), ``entropy`` (mean entropy in
nats of the predictive distribution over every input token); both token-weighted over the step. Evaluation
(every ``eval_steps`` and at the end, when ``eval_dataset_name`` or ``eval_data`` is set): ``eval_loss``,
token-weighted over the whole evaluation set, ``eval_perplexity`` = exp(``eval_loss``), ``eval_mean_token_accuracy``
and ``eval_entropy``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from otalign.data.reading import numbered
from otalign.data.sft import IGNORE_INDEX, TEXT_FIELD, SFTExample, encode_sft, load_sft_data
from otalign.data.truncation import kept
from otalign.models import context_window, load_causal_lm, load_tokenizer

from .config import redefault
from .dataset import DatasetConfig
from .metrics import EVAL_PREFIX, Timer
from .supervised import SupervisedTrainer

Row = tuple[list[int], list[int]]
"""One training row: (input_ids, labels)."""


@dataclass
class SFTConfig(DatasetConfig):
    """SFT settings (TRL ``SFTConfig`` names): the dataset options of :class:`DatasetConfig`, and packing."""

    output_dir: str = redefault(DatasetConfig, "output_dir", "runs/sft")
    learning_rate: float = redefault(DatasetConfig, "learning_rate", 2e-5)
    packing: bool = field(
        default=False, metadata={"help": "concatenate examples into rows of exactly max_length tokens"}
    )
    dataset_text_field: str = field(
        default=TEXT_FIELD,
        metadata={"help": "column of language-modeling rows (TRL's {'text': ...} form; the loss covers every token)"},
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "prompt-completion rows: the loss on the completion only (true, or none: TRL's default) or on "
            "prompt and completion (false); true with text or messages rows is an error, as in TRL"
        },
    )


def pack(rows: list[Row], length: int, seed: int) -> list[Row]:
    """``rows`` concatenated in a seeded order and cut into rows of ``length`` tokens (the remainder dropped).

    Raises:
        ValueError: fewer than ``length`` tokens in all.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    ids = [t for i in order for t in rows[i][0]]
    labels = [t for i in order for t in rows[i][1]]
    if len(ids) < length:
        raise ValueError(f"packing: the dataset has {len(ids)} tokens, fewer than one row of max_length={length}")
    return [(ids[s : s + length], labels[s : s + length]) for s in range(0, len(ids) - length + 1, length)]


def collate(rows: list[Row], pad_token_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding), each (N, S) int64."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed float32 cross-entropy (nats) of the labelled tokens of ``batch`` (position t predicts token t + 1),
    and detached 0-dim float32 sums for TRL's SFT metrics (:func:`token_metrics`): ``tokens`` (labelled tokens),
    ``correct`` (those the logits' argmax predicts), ``entropy`` (nats of the softmax of the logits at the positions
    predicting a labelled token, summed, as TRL 1.16) and ``positions`` (real, non-padding tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    shifted = logits[:, :-1].float()
    loss = F.cross_entropy(shifted.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    with torch.no_grad():
        trained, real = targets != IGNORE_INDEX, batch["attention_mask"].bool()
        predicting = shifted.detach()
        entropy = torch.logsumexp(predicting, -1) - (predicting.softmax(-1) * predicting).sum(-1)
        sums = {
            "tokens": trained.sum().float(),
            "correct": ((predicting.argmax(-1) == targets) & trained).sum().float(),
            "entropy": entropy[trained].sum(),
            "positions": real.sum().float(),
        }
    return loss, sums


def token_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """TRL's ``mean_token_accuracy`` (share of labelled tokens the argmax predicts) and ``entropy`` (mean nats per
    labelled token) from :func:`response_loss` sums, token-weighted over everything summed."""
    return {
        "mean_token_accuracy": float(sums["correct"] / sums["tokens"].clamp(min=1.0)),
        "entropy": float(sums["entropy"] / sums["tokens"].clamp(min=1.0)),
    }


class SFTTrainer(SupervisedTrainer):
    """Causal-LM fine-tuning with the loss on response tokens only.

    Args:
        config: :class:`SFTConfig`.
        model: causal LM to train (before LoRA); default from ``model_name_or_path``.
        tokenizer: its tokenizer.
        train_data, eval_data: :class:`~otalign.data.sft.SFTExample` rows instead of the config's datasets.
        accelerator: an existing ``accelerate.Accelerator``.

    Raises:
        ValueError: bad rows (naming source, row and field), an example with no trained token (within
            ``max_length``), longer than ``max_length`` with ``truncation_mode: error``, or longer than the model's
            context: all before training.
    """

    progress_keys = ("loss",)

    def __init__(
        self,
        config: SFTConfig,
        *,
        model=None,
        tokenizer=None,
        train_data: list[SFTExample] | None = None,
        eval_data: list[SFTExample] | None = None,
        accelerator=None,
    ) -> None:
        super().__init__(config, accelerator)
        c = config
        load = partial(load_sft_data, dataset_text_field=c.dataset_text_field)
        train_data, eval_data = self.load_datasets(train_data, eval_data, load)
        self.plan_evaluation(bool(eval_data))
        self.tokenizer = tokenizer or load_tokenizer(c.model_name_or_path)
        model = model if model is not None else load_causal_lm(c.model_name_or_path, **c.model_kwargs)
        limit = context_window(model)
        self.train_rows = self._encode(train_data, c.dataset_name or "train_data", limit)
        if c.packing:
            if limit is not None and c.max_length > limit:
                raise ValueError(f"packing: max_length={c.max_length} is more than the model's context of {limit}")
            self.train_rows = pack(self.train_rows, c.max_length, c.seed)
        self.eval_rows = self._encode(eval_data, c.eval_dataset_name or "eval_data", limit) if eval_data else None
        self.count_examples(len(self.train_rows))
        self.prepare_model(model, task_type="CAUSAL_LM")

    def _encode(self, examples: list[SFTExample], source: str, limit: int | None) -> list[Row]:
        """Encoded rows; without packing each cut to ``max_length`` by ``truncation_mode`` (TRL's rule)."""
        if not examples:
            raise ValueError(f"{source}: the dataset is empty")
        c = self.config
        rows = []
        for row, example in numbered(examples):
            where = f"{source}, row {row}"
            ids, labels = encode_sft(self.tokenizer, example, where)
            if example.prompt is None and c.completion_only_loss:
                form = "text" if example.text is not None else "messages"
                raise ValueError(f"{where}: completion_only_loss true needs prompt-completion rows, got a {form} row")
            if example.prompt is not None and c.completion_only_loss is False:
                labels = list(ids)  # TRL: the loss on the whole sequence
            if not c.packing:
                span = kept(len(ids), c.max_length, c.truncation_mode, where)
                ids, labels = ids[span], labels[span]
            if all(t == IGNORE_INDEX for t in labels[1:]):
                raise ValueError(f"{where}: no response token to train on within max_length={c.max_length}")
            if not c.packing and limit is not None and len(ids) > limit:
                raise ValueError(f"{where}: {len(ids)} tokens, more than the model's context of {limit}")
            rows.append((ids, labels))
        return rows

    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` steps (resuming if asked); returns the metrics of the steps run."""
        c, acc = self.config, self.accelerator
        history = []
        start = self.begin()
        self.print(
            f"SFT: {len(self.train_rows)} {'packed rows' if c.packing else 'examples'}, {c.max_steps} steps x "
            f"{c.step_batch_size * acc.num_processes}, device={acc.device}, processes={acc.num_processes}"
        )
        num_tokens = self.total_before(start, [len(ids) for ids, _ in self.train_rows])
        for step in self.steps(start):
            timer = Timer(acc.device)
            parts = self.micro_batches(step, self.train_rows)
            micro = [collate(rows, self.tokenizer.pad_token_id, acc.device) for rows in parts]
            counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
            total = max(float(acc.reduce(torch.tensor(sum(counts), device=acc.device), "sum")), 1.0)
            loss_sum, sums = 0.0, {}
            for m, batch in enumerate(micro):
                with self.no_sync(last=m == len(micro) - 1):
                    loss, part = response_loss(self.policy, batch)
                    self.guard.watch("the loss", loss, self.divergence_cause())
                    timer.lap("forward")
                    # DDP averages gradients over processes: scale so the step's gradient is the global token mean.
                    acc.backward(loss * acc.num_processes / total)
                    timer.lap("backward")
                loss_sum += float(loss.detach())
                sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
            optimizer_metrics = self.optimizer_step(step)
            timer.lap("update")
            sums = {k: acc.reduce(v, "sum") for k, v in sums.items()}
            loss_total = float(acc.reduce(torch.tensor(loss_sum, device=acc.device), "sum"))
            num_tokens += int(sums["positions"])
            metrics = {"loss": loss_total / total, "num_tokens": num_tokens, **token_metrics(sums)}
            metrics.update({**optimizer_metrics, **timer.metrics()})
            if self.evaluate_now(step):
                metrics.update(self.evaluate())
            history.append(metrics)
            self.end_step(step, metrics)
        return self.conclude(history)

    @torch.no_grad()
    def evaluate(self, rows: list[Row] | None = None) -> dict[str, float]:
        """``eval_loss`` (nats per response token), ``eval_perplexity``, ``eval_mean_token_accuracy`` and
        ``eval_entropy`` of the model on ``rows`` (default: the evaluation set). Every process evaluates all rows."""
        rows = self.eval_rows if rows is None else rows
        model = self.accelerator.unwrap_model(self.policy)
        was_training = model.training
        model.eval()
        size = self.config.eval_batch_size
        loss_sum, sums = 0.0, {}
        for s in range(0, len(rows), size):
            batch = collate(rows[s : s + size], self.tokenizer.pad_token_id, self.accelerator.device)
            loss, part = response_loss(model, batch)
            loss_sum += float(loss)
            sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
        model.train(was_training)
        loss = loss_sum / max(float(sums["tokens"]), 1.0)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), **token_metrics(sums)}
        return {f"{EVAL_PREFIX}{k}": v for k, v in metrics.items()}
