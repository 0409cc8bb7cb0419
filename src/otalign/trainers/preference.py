r"""Preference optimization (DPO family, AOT, KTO, OTPO token weighting): ``PreferenceTrainer``.

Settings: :class:`~otalign.trainers.preference_config.PreferenceConfig`.

One step, read top to bottom in :meth:`PreferenceTrainer.train`, per micro-batch:

1. **Forward**: the policy on every (prompt, completion) sequence of the micro-batch, chosen and
   rejected completions of a pair in one forward pass; per-token log-probs in float32 and, for OTPO,
   the last layer's hidden states (detached) at the positions that predict each completion token.
2. **OTPO weights** (``token_weighting: otpo``): :func:`otalign.losses.otpo_weights` on the hidden
   states of each pair, all pairs at once; they weight the per-token log-probs of policy *and*
   reference: :math:`\log\pi_w(y|x) = \sum_t w_t \log\pi(y_t|x, y_{<t})`.
3. **Reference**: the frozen reference model's log-probs (or the ones computed once up front, or the
   dataset's ``ref_*_logps`` columns), weighted the same way.
4. **Loss**: a loss object (:mod:`otalign.losses.interface`, by name from :data:`otalign.losses.PREFERENCE_LOSSES`),
   pairwise on paired data or on labelled completions (a pair's chosen completion desirable, its rejected one
   undesirable); it returns the loss and the implicit rewards behind the ``rewards/*`` metrics
   (:mod:`otalign.trainers.preference_metrics`).

Data: paired ``prompt/chosen/rejected`` or unpaired ``prompt/completion/label`` rows
(:mod:`otalign.data.preference`). Each step every process takes ``per_device_train_batch_size`` x
``gradient_accumulation_steps`` pairs (or labelled completions, desirable and undesirable in the dataset's
proportion, at least one of each) from seeded per-epoch permutations; the position in the data follows from the step, so
resuming from a checkpoint continues exactly where the run stopped.
"""

from __future__ import annotations

import torch

from otalign.data.preference import Example, PreferencePair, encode, load_preference_data
from otalign.data.reading import numbered
from otalign.data.truncation import truncate_pair
from otalign.losses import call_loss, implicit_rewards, otpo_weights, sequence_logps
from otalign.models import AdapterDisabled, apply_lora, check_fits_context, frozen_copy, load_causal_lm, load_tokenizer

from .base import BaseTrainer
from .config import ConfigError
from .dataset import shuffled
from .metrics import EVAL_PREFIX, Timer
from .preference_batch import SequenceBatch, collate, completion_logps
from .preference_config import PreferenceConfig
from .preference_metrics import example_records, otpo_records, summarize

Key = tuple[str, int, str]
"""A sequence: (split ``train``/``eval``, row index, side ``chosen``/``rejected``/``completion`` [+ ``_kl``])."""


class PreferenceTrainer(BaseTrainer):
    """Preference optimization of a causal LM with any loss object and optional OTPO token weighting.

    Everything not passed in is built from the config.

    Args:
        config: :class:`PreferenceConfig`.
        policy: causal LM to train (before LoRA is applied).
        ref_model: frozen reference (default: ``ref_model_name_or_path``, else with ``use_peft`` the policy's base
            with its adapters disabled (:class:`otalign.models.AdapterDisabled`, as TRL), else a frozen copy of
            ``policy``).
        tokenizer: the policy's tokenizer.
        train_data: :class:`~otalign.data.preference.PreferencePair` or ``LabeledCompletion`` rows instead
            of ``config.dataset_name``.
        eval_data: preference pairs instead of ``config.eval_dataset_name``.
        loss: a loss object (see :mod:`otalign.losses.interface`) instead of ``config.loss_type``.
        accelerator: an existing ``accelerate.Accelerator``.

    Raises:
        ValueError: bad rows (naming source, row and field), rows longer than ``max_length`` (with
            ``truncation_mode: error``) or the model's context, a pairwise loss on unpaired data, dataset reference
            columns with OTPO or KTO: all before training.
    """

    progress_keys = ("loss", "rewards/accuracies", "rewards/margins")

    def __init__(
        self,
        config: PreferenceConfig,
        *,
        policy=None,
        ref_model=None,
        tokenizer=None,
        train_data: list[Example] | None = None,
        eval_data: list[PreferencePair] | None = None,
        loss=None,
        accelerator=None,
    ) -> None:
        super().__init__(config, accelerator)
        c = config
        self.loss = loss or c.build_loss()
        self.otpo = c.token_weighting == "otpo"
        self.train_data = self._load(train_data, c.dataset_name, "dataset_name", c.dataset_train_split)
        self.eval_data = self._load(
            eval_data, c.eval_dataset_name, "eval_dataset_name", c.dataset_test_split, required=False
        )
        self.plan_evaluation(self.eval_data is not None)
        self.paired = isinstance(self.train_data[0], PreferencePair)
        if self.loss.paired and not self.paired:
            raise ValueError(f"loss_type {c.loss_type!r} needs paired prompt/chosen/rejected data")
        self.streams = None if self.paired else self._unpaired_streams()
        if self.eval_data is not None and not isinstance(self.eval_data[0], PreferencePair):
            raise ValueError("the evaluation data must be paired prompt/chosen/rejected rows")

        self.tokenizer = tokenizer or load_tokenizer(c.model_name_or_path)
        self.sequences: dict[Key, tuple[list[int], list[int]]] = {}
        self._encode("train", self.train_data, c.dataset_name or "train_data")
        if self.eval_data is not None:
            self._encode("eval", self.eval_data, c.eval_dataset_name or "eval_data")
        policy = policy if policy is not None else load_causal_lm(c.model_name_or_path, **c.model_kwargs)
        self._check_context(policy)

        device = self.accelerator.device
        self.ref_values = self._dataset_reference()
        self.ref_tokens: dict[Key, torch.Tensor] | None = None
        self.ref_model = None
        # with LoRA and no reference given: the policy's base with adapters disabled (after prepare), as TRL
        shares_weights = self.ref_values is None and ref_model is None and not c.ref_model_name_or_path and c.use_peft
        if self.ref_values is None and not shares_weights:
            if ref_model is None:
                path = c.ref_model_name_or_path
                ref_model = load_causal_lm(path, **c.model_kwargs) if path else frozen_copy(policy)
            self._set_reference(ref_model.eval().requires_grad_(False).to(device))
        if c.use_peft:
            policy = apply_lora(
                policy, r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout, target_modules=c.lora_target_modules
            )
        policy.eval()  # dropout off: the log-ratios of policy and reference must be comparable (TRL disable_dropout)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.policy, self.optimizer = self.prepare(policy, self.create_optimizer(self.params))
        # FSDP2 replaces the parameters with sharded ones: clip those (the optimizer's), not the originals
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if shares_weights:
            self._set_reference(AdapterDisabled(self.accelerator.unwrap_model(self.policy)))
        self.count_examples(len(self.train_data))
        self.scheduler = self.create_scheduler(self.optimizer)

    def _set_reference(self, ref_model) -> None:
        """Use ``ref_model`` as the reference, or (``precompute_ref_log_probs``) only once, to precompute."""
        self.ref_model = ref_model
        if self.config.precompute_ref_log_probs:
            self.ref_tokens = self._precompute_reference()
            self.ref_model = None

    # ------------------------------------------------------------------ data
    def _load(self, given, source, option, split, *, required=True):
        if given is not None:
            if not given:
                raise ValueError("the dataset is empty")
            return list(given)
        if source is None:
            if required:
                raise ConfigError(f"set {option} (a .jsonl/.json/.parquet file or a Hugging Face dataset name)")
            return None
        return load_preference_data(source, split, self.config.dataset_config)

    def _encode(self, split: str, examples: list[Example], source: str) -> None:
        """Token ids of every completion, cut to ``max_length`` by ``truncation_mode`` (and, for KTO, of each prompt
        with the next row's completion)."""
        c = self.config
        for i, (row, example) in enumerate(numbered(examples)):
            where = f"{source}, row {row}"
            sides = (
                {"chosen": example.chosen, "rejected": example.rejected}
                if isinstance(example, PreferencePair)
                else {"completion": example.completion}
            )
            for side, completion in sides.items():
                prompt_ids, completion_ids = encode(self.tokenizer, example.prompt, completion, where)
                if not prompt_ids or not completion_ids:
                    raise ValueError(f"{where}, field {side!r}: the prompt or the completion encodes to no tokens")
                self.sequences[(split, i, side)] = truncate_pair(
                    prompt_ids, completion_ids, c.max_length, c.truncation_mode, f"{where}, field {side!r}"
                )
        if self.loss.needs_kl and split == "train":
            # KTO's reference point: prompt i with the completion of row i + 1 (cut to fit max_length).
            for (_, i, side), (prompt_ids, _) in list(self.sequences.items()):
                partner = self.sequences[(split, (i + 1) % len(examples), side)][1]
                self.sequences[(split, i, side + "_kl")] = (prompt_ids, partner[: c.max_length - len(prompt_ids)])

    def _check_context(self, model) -> None:
        longest = max(len(p) + len(c) for p, c in self.sequences.values())
        check_fits_context(model, longest, "a row", "lower max_length")

    def _dataset_reference(self) -> dict[Key, float] | None:
        """Reference sequence log-probs from the dataset's ``ref_*_logps`` columns, or None without them."""
        data = {"train": self.train_data, "eval": self.eval_data or []}
        columns = {"chosen": "ref_chosen_logps", "rejected": "ref_rejected_logps", "completion": "ref_logps"}
        values = {}
        for key in self.sequences:
            split, i, side = key
            values[key] = getattr(data[split][i], columns.get(side, "missing"), None)
        train = [v for (split, _, _), v in values.items() if split == "train"]
        if all(v is None for v in train):
            return None
        if self.otpo or self.loss.needs_kl:
            raise ValueError(
                "the dataset's reference log-probs are sequence totals, but OTPO needs per-token values and KTO the "
                "log-probs of mismatched pairs: drop the ref_* columns to use a reference model"
            )
        missing = sorted({split for (split, _, _), v in values.items() if v is None})
        if missing:
            raise ValueError(f"the training data has reference log-probs but the {missing[0]} data has none")
        return values

    @torch.no_grad()
    def _precompute_reference(self) -> dict[Key, torch.Tensor]:
        """Per-token reference log-probs (float32, CPU) of every sequence, in batches."""
        keys = list(self.sequences)
        size = self.config.per_device_train_batch_size
        found = {}
        for start in range(0, len(keys), size):
            chunk = keys[start : start + size]
            batch = self._collate(chunk)
            token_logps, _, _ = completion_logps(self.ref_model, batch)
            for row, key in enumerate(chunk):
                found[key] = token_logps[row, : len(self.sequences[key][1])].cpu()
        self.print(f"precomputed reference log-probs of {len(keys)} sequences")
        return found

    def micro_batches(self, step: int) -> list[tuple[list[Key], torch.Tensor, int]]:
        """This process's sequences for ``step``, as ``(keys, labels, pairs)`` per micro-batch.

        Paired data: ``keys`` lists the chosen then the rejected completions of ``pairs`` pairs.
        Unpaired data: desirable then undesirable completions (``pairs`` = 0). ``labels``: (N,) bool.
        """
        c, acc = self.config, self.accelerator
        b, accum = c.step_batch_size, c.gradient_accumulation_steps
        if self.paired:
            start = ((step - 1) * acc.num_processes + acc.process_index) * b
            rows = tuple(range(len(self.train_data)))
            ids = [shuffled(start + j, rows, c.seed) for j in range(b)]
            micro = [ids[m::accum] for m in range(accum)]
            return [(pair_keys("train", part), _labels(len(part), len(part)), len(part)) for part in micro]
        good, bad, n_good = self.streams
        sides = []
        for stream, (items, k) in enumerate(((good, n_good), (bad, b - n_good))):
            start = ((step - 1) * acc.num_processes + acc.process_index) * k
            sides.append([shuffled(start + j, items, c.seed + stream + 1) for j in range(k)])
        batches = []
        for m in range(accum):
            good_part, bad_part = sides[0][m::accum], sides[1][m::accum]
            keys = [("train", i, "completion") for i in good_part + bad_part]
            batches.append((keys, _labels(len(good_part), len(bad_part)), 0))
        return batches

    def _unpaired_streams(self) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """Desirable and undesirable row ids, and how many desirable ones each process takes per step.

        Raises:
            ValueError: a micro-batch would miss desirable or undesirable completions.
        """
        b, accum = self.config.step_batch_size, self.config.gradient_accumulation_steps
        good = tuple(i for i, e in enumerate(self.train_data) if e.label)
        bad = tuple(i for i, e in enumerate(self.train_data) if not e.label)
        n_good = min(max(round(b * len(good) / len(self.train_data)), 1), b - 1)
        if min(n_good, b - n_good) < accum:
            raise ValueError(
                f"unpaired data: {b} completions per process per step give {n_good} desirable and "
                f"{b - n_good} undesirable completions, too few for {accum} micro-batches with both; raise the batch"
            )
        return good, bad, n_good

    def _collate(self, keys: list[Key]) -> SequenceBatch:
        return collate([self.sequences[k] for k in keys], self.tokenizer.pad_token_id, self.accelerator.device)

    # ------------------------------------------------------------------ scoring
    def reference_logps(self, keys: list[Key], batch: SequenceBatch, weights: torch.Tensor | None) -> torch.Tensor:
        """(N,) reference sequence log-probs of ``keys`` (token-weighted by ``weights`` (N, T) if given), float32."""
        if self.ref_values is not None:
            return torch.tensor([self.ref_values[k] for k in keys], device=batch.mask.device)
        if self.ref_model is not None:
            with torch.no_grad():
                token_logps, _, _ = completion_logps(self.ref_model, batch)
        else:
            token_logps = torch.zeros(batch.mask.shape, device=batch.mask.device)
            for row, key in enumerate(keys):
                values = self.ref_tokens[key]
                token_logps[row, : values.shape[0]] = values.to(token_logps.device)
        return sequence_logps(token_logps, batch.mask, weights)

    def token_weights(self, states: torch.Tensor, mask: torch.Tensor, pairs: int) -> torch.Tensor:
        """(2n, T) OTPO weights of ``pairs`` = n pairs (rows: chosen, then rejected) from hidden states (2n, T, H)."""
        c = self.config
        chosen, rejected = otpo_weights(
            states[:pairs], states[pairs:], mask[:pairs], mask[pairs:], eps1=c.otpo_eps1, eps2=c.otpo_eps2
        )
        return torch.cat([chosen, rejected])

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` steps (resuming if asked); returns the metrics of the steps run."""
        c, acc = self.config, self.accelerator
        history = []
        start = self.begin()
        self.print(
            f"preference optimization: loss={c.loss_type}, token_weighting={c.token_weighting}, beta={c.beta}, "
            f"{c.max_steps} steps x {c.step_batch_size * acc.num_processes} "
            f"{'pairs' if self.paired else 'completions'}, device={acc.device}, processes={acc.num_processes}"
        )
        for step in self.steps(start):
            timer = Timer(acc.device)
            micro = self.micro_batches(step)
            records, extra = [], {}
            for m, (keys, labels, pairs) in enumerate(micro):
                with self.no_sync(last=m == len(micro) - 1):
                    loss, record, stats = self.micro_step(keys, labels.to(acc.device), pairs, timer)
                    self.guard.watch("the loss", loss, self.divergence_cause())
                    acc.backward(loss / len(micro))
                    timer.lap("backward")
                records.append(record)
                for name, value in {"loss": float(loss.detach()), **stats}.items():
                    extra[name] = extra.get(name, 0.0) + value / len(micro)
            optimizer_metrics = self.optimizer_step(step)
            timer.lap("update")

            merged = {k: torch.cat([r[k] for r in records]) for k in records[0]}
            metrics = summarize(acc.gather(merged))
            metrics.update({k: float(acc.reduce(torch.tensor(v, device=acc.device), "mean")) for k, v in extra.items()})
            metrics.update(optimizer_metrics)
            metrics.update(timer.metrics())
            if self.evaluate_now(step):
                metrics.update(self.evaluate())
            history.append(metrics)
            self.end_step(step, metrics)
        if self.evaluate_at_end:
            self.metrics.log(self.evaluate(), c.max_steps)
        if c.save_model:
            self.save_model()
        self.finish()
        return history

    def micro_step(self, keys: list[Key], labels: torch.Tensor, pairs: int, timer: Timer):
        """Loss of one micro-batch (with gradient), its per-example records for metrics, and the loss's stats."""
        batch = self._collate(keys)
        token_logps, states, logit_sums = completion_logps(self.policy, batch, hidden=self.otpo)
        timer.lap("forward")
        weights = None
        if self.otpo:
            weights = self.token_weights(states, batch.mask, pairs)
            timer.lap("otpo")
        policy = sequence_logps(token_logps, batch.mask, weights)
        ref = self.reference_logps(keys, batch, weights)
        kl = (None, None)
        if self.loss.needs_kl:
            kl_keys = [(split, i, side + "_kl") for split, i, side in keys]
            kl_batch = self._collate(kl_keys)
            with torch.no_grad():
                kl_logps, _, _ = completion_logps(self.accelerator.unwrap_model(self.policy), kl_batch)
            kl = (sequence_logps(kl_logps, kl_batch.mask), self.reference_logps(kl_keys, kl_batch, None))
        timer.lap("forward")
        lengths = batch.mask.sum(1)
        out = call_loss(self.loss, policy, ref, labels, pairs=pairs, lengths=lengths, beta=self.config.beta, kl=kl)
        logps = sequence_logps(token_logps.detach(), batch.mask)  # unweighted, as TRL's logps/* metrics
        record = example_records(out.rewards, logps, labels, logit_sums, lengths, pairs)
        if weights is not None:
            record.update(otpo_records(weights[:pairs], weights[pairs:], batch.mask[:pairs], batch.mask[pairs:]))
        return out.loss, record, out.stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Implicit-reward metrics (``eval_rewards/accuracies``, ``eval_logits/chosen``, ...) of the policy on the
        evaluation pairs.

        Rewards are the plain (unweighted) :math:`\\beta(\\log\\pi_\\theta - \\log\\pi_{ref})` of each
        completion; the training pairs are used when there is no evaluation data. Every process
        evaluates all pairs.
        """
        split = "eval" if self.eval_data is not None else "train"
        if split == "train" and not self.paired:
            raise ValueError("evaluation needs preference pairs: pass eval_data or set eval_dataset_name")
        n = len(self.eval_data if split == "eval" else self.train_data)
        model = self.accelerator.unwrap_model(self.policy)
        size = self.config.eval_batch_size
        records = []
        for start in range(0, n, size):
            rows = range(start, min(start + size, n))
            keys = pair_keys(split, rows)
            batch = self._collate(keys)
            token_logps, _, logit_sums = completion_logps(model, batch)
            policy = sequence_logps(token_logps, batch.mask)
            rewards = implicit_rewards(policy, self.reference_logps(keys, batch, None), self.config.beta)
            labels = _labels(len(rows), len(rows)).to(rewards.device)
            records.append(example_records(rewards, policy, labels, logit_sums, batch.mask.sum(1), len(rows)))
        merged = {k: torch.cat([r[k] for r in records]) for k in records[0]}
        return {f"{EVAL_PREFIX}{k}": v for k, v in summarize(merged).items()}


def pair_keys(split: str, rows) -> list[Key]:
    """Keys of the chosen completions of ``rows``, then of their rejected ones."""
    return [(split, i, side) for side in ("chosen", "rejected") for i in rows]


def _labels(good: int, bad: int) -> torch.Tensor:
    return torch.cat([torch.ones(good, dtype=torch.bool), torch.zeros(bad, dtype=torch.bool)])
