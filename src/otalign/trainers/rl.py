r"""The RL loop every RL trainer (PPO, GRPO, RLOO) runs: :class:`RLTrainer`. Read :meth:`RLTrainer.train` top to
bottom; each stage is one call:

1. :meth:`RLTrainer.sample`: one response per global sample index from the current policy; sample ``i`` answers
   prompt position ``i // num_generations`` (a group of ``num_generations`` consecutive indices shares a prompt,
   and a process always holds whole groups), with its own sampling seed.
2. :meth:`RLTrainer.score_rollout` (no grad): one pass over the rollout in chunks of ``scoring_batch_size`` rows
   (:func:`otalign.scoring.score_rollout`: the sampled tokens' log-probabilities under policy and reference, exact
   KL and entropy, the regularizer's penalty and, with the penalty in the loss, its potentials from the same solve),
   then the rewards (:class:`~otalign.trainers.reward_sum.RewardSum`).
3. :meth:`RLTrainer.advantages`, the algorithm's: GAE with a critic (PPO), group baselines (GRPO, RLOO); it
   returns a :class:`RolloutBatch`.
4. :meth:`RLTrainer.update`: passes over shuffled mini-batches, each accumulated over micro-batches, minimising the
   algorithm's :meth:`RLTrainer.loss` (which adds the penalty placement's loss term).
5. :meth:`RLTrainer.end_rl_step`: log, move the adaptive beta (:class:`~otalign.trainers.beta.BetaController`),
   checkpoint.

The algorithm is the small interface a subclass implements: :attr:`num_epochs`, :meth:`advantages`, :meth:`loss`,
:meth:`batch_metrics` (and :meth:`log_rollout`, :meth:`build_models` for models trained beside the policy, PPO's
critic, and :meth:`normalizers` where a loss is not normalised over the global mini-batch). The learning-rate schedule
steps once per optimizer step (``num_epochs x num_mini_batches`` per rollout, as TRL), while ``max_steps``,
``global_step`` and checkpoints count rollouts. Where the
penalty goes (``penalty_in``) is one object chosen at start (:mod:`otalign.trainers.penalty`); the regularizer is
built by its registry entry from the config (:func:`otalign.regularizers.regularizer_from_config`), so no trainer
names a regularizer.

**Guards.** Before any update of a step, the rollout's log-probabilities, rewards and penalty must be finite
(:class:`~otalign.guard.FiniteGuard`; non-finite logits always stop the run, the rest follow ``on_nonfinite``), and
each optimizer step checks its losses and gradient norm (:meth:`~otalign.trainers.base.BaseTrainer.apply_gradients`).
A solve that stops above its tolerance is counted in ``sinkhorn/unconverged_frac`` and warned about once per run
(:class:`~otalign.guard.ConvergenceWarning`), or stops the run with ``wpr_strict``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from otalign.data import load_prompt_rows, prompt_columns, render_prompt, validate_prompt
from otalign.data.reading import numbered
from otalign.generation import Rollout, encode_prompts, generate, sample_seeds
from otalign.guard import NonFiniteError
from otalign.models import AdapterDisabled, apply_lora, check_fits_context, frozen_copy, load_causal_lm, load_tokenizer
from otalign.regularizers import k3, regularizer_from_config
from otalign.rewards import Reward, build_reward
from otalign.scoring import score_rollout

from . import ppo_math as pm
from .base import BaseTrainer
from .beta import BetaController
from .config import stream_seed
from .metrics import EVAL_PREFIX, Timer
from .penalty import penalty_placement
from .reward_sum import RewardSum
from .rl_config import LOSS_POTENTIALS, PENALTY_IN, RLConfig
from .rl_metrics import global_max, report_convergence, rollout_metrics
from .rollout_batch import RolloutBatch, ScoredRollout


def as_rows(prompts: list) -> list[dict]:
    """Prompt rows from Python prompts: strings or message lists (no columns), or dicts with a ``prompt``."""
    return [
        {**p, "prompt": validate_prompt(p, f"prompts[{i}]")} if isinstance(p, dict) else {"prompt": p}
        for i, p in enumerate(prompts)
    ]


class PromptSet(NamedTuple):
    """Prompts ready to sample from: their rows (``prompt`` and columns), the column names, the rendered texts and
    the token ids."""

    rows: list[dict]
    columns: list[str]
    texts: list[str]
    ids: list[list[int]]


def check_context(model, prompt_ids: list[list[int]], response_length: int) -> None:
    """``ValueError`` if the longest prompt plus ``response_length`` exceeds the model's context window."""
    longest = max(len(ids) for ids in prompt_ids)
    what = f"the longest prompt ({longest} tokens) plus response_length={response_length}"
    check_fits_context(model, longest + response_length, what, "shorten the prompts or response_length")


def response_extreme(values: torch.Tensor, kind: str, accelerator) -> float:
    """The minimum (``kind`` ``min``) or maximum (``max``) of the per-response ``values`` (b,) over all processes,
    NaN entries left out (TRL's ``nanmin``/``nanmax`` of the gathered values); NaN when every entry is."""
    sign = -1.0 if kind == "min" else 1.0
    finite = torch.nan_to_num(sign * values.double(), nan=-math.inf)
    found = global_max(finite.reshape(-1) if finite.numel() else finite.new_full((1,), -math.inf), accelerator)
    return sign * found if math.isfinite(found) else float("nan")


def distance_key(regularizer) -> str:
    """The statistic that measures ``regularizer``'s distance per token (its ``distance_stat``)."""
    return getattr(regularizer, "distance_stat", "penalty/mean")


class RLTrainer(BaseTrainer):
    """Base of :class:`~otalign.trainers.PPOTrainer` and the critic-free trainers (see the module docstring).

    Args:
        config: an :class:`~otalign.trainers.rl_config.RLConfig`.
        policy: causal LM to train (before LoRA is applied); default: loaded from ``model_name_or_path``.
        ref_model: frozen reference (default: a frozen copy of ``policy`` as given; with ``use_peft`` the policy's
            base with its adapters disabled, :class:`otalign.models.AdapterDisabled`, as TRL: no second copy).
        tokenizer: the policy's tokenizer (default: loaded from ``model_name_or_path``).
        reward: an :class:`otalign.rewards.Reward`, a callable ``fn(prompts, responses, **columns)``, or a list of
            them (summed with ``reward_weights``); default: from the config.
        regularizer: an :class:`otalign.regularizers.Regularizer` (with a support gradient or a ``loss_term`` for
            ``penalty_in: loss``); default: built by the registry from the config.
        prompts: prompts (strings, message lists, or dicts with ``prompt`` and columns) instead of ``config.prompts``.
        eval_prompts: held-out prompts (as ``prompts``) instead of ``config.eval_dataset_name``, evaluated as
            ``eval_strategy`` says (:meth:`evaluate`).
        accelerator: an existing ``accelerate.Accelerator``.

    Raises:
        ValueError: bad prompts (empty set, too long for ``max_prompt_length`` or the context window),
            unknown reward or regularizer, a reward model with another tokenizer, ``eval_strategy``/``eval_steps``
            without held-out prompts: all before training.
    """

    num_generations = 1
    """Responses per prompt (a group); the critic-free trainers set it from their config."""
    algorithm_name = "RL"
    """Name in the start-of-run line."""

    def __init__(
        self,
        config: RLConfig,
        *,
        policy=None,
        ref_model=None,
        tokenizer=None,
        reward=None,
        regularizer=None,
        prompts: list | None = None,
        eval_prompts: list | None = None,
        accelerator=None,
    ) -> None:
        super().__init__(config, accelerator)
        c = config
        self.tokenizer = tokenizer or load_tokenizer(c.model_name_or_path)
        train = self.prompt_set(prompts, c.prompts, c.prompts_split, "prompts")
        self.prompt_rows, self.column_names, self.prompt_texts, self.prompt_ids = train
        self.eval_set = None
        if eval_prompts is not None or c.eval_dataset_name is not None:
            self.eval_set = self.prompt_set(eval_prompts, c.eval_dataset_name, c.dataset_test_split, "eval_prompts")
        self.plan_evaluation(self.eval_set is not None)
        self.reward_sum = RewardSum(
            self.given_rewards(reward),
            c.reward_weights,
            missing_eos_penalty=c.missing_eos_penalty,
            eos_token_id=self.tokenizer.eos_token_id,
            clip=c.reward_clip,
        )
        self.reward_sum.check_columns(self.column_names)
        if self.eval_set is not None:
            self.reward_sum.check_columns(self.eval_set.columns)
        self.beta_controller = BetaController(c.beta_value, c.beta_target, c.beta_horizon)
        policy = self.load_models(policy, ref_model, regularizer)
        extra = self.build_models(policy)
        self.policy, *prepared = self.prepare_training(policy, *extra.values())
        for name, model in zip(extra, prepared, strict=True):
            setattr(self, name, model)
        self.placement = penalty_placement(
            c.penalty_in, self.regularizer, c.loss_potentials, self.ref_model, c.temperature, c.use_bias_correction_kl
        )

    # ------------------------------------------------------------------ setup
    def prompt_set(self, prompts: list | None, name: str, split: str, argument: str) -> PromptSet:
        """The prompts given in Python (``prompts``, named ``argument`` in errors) or else the set ``name``'s
        ``split``, rendered and encoded.

        Raises:
            ValueError: an empty set, a prompt longer than ``max_prompt_length`` (naming the row).
        """
        c = self.config
        rows = load_prompt_rows(name, split) if prompts is None else as_rows(list(prompts))
        source = name if prompts is None else argument
        if not rows:
            raise ValueError(f"{source}: the prompt set is empty")
        texts = [render_prompt(r["prompt"], self.tokenizer, use_chat_template=c.use_chat_template) for r in rows]
        ids = encode_prompts(
            self.tokenizer,
            texts,
            max_prompt_length=c.max_prompt_length,
            source=source,
            numbers=[i for i, _ in numbered(rows)],
        )
        return PromptSet(rows, prompt_columns(rows, source), texts, ids)

    def build_models(self, policy) -> dict:
        """Models trained next to the policy, by attribute name (PPO: its critic), built from the policy before
        LoRA; none by default."""
        return {}

    def given_rewards(self, reward) -> list:
        """The rewards: the ``reward`` argument (one or a list), else the config's functions or reward model."""
        c = self.config
        if reward is not None:
            return list(reward) if isinstance(reward, (list, tuple)) else [reward]
        if c.reward_model_name_or_path is None:
            return [build_reward(name) for name in c.reward_fn]
        model = build_reward(
            None,
            c.reward_model_name_or_path,
            policy_tokenizer=self.tokenizer,
            retokenize=c.reward_retokenize,
            dtype=c.model_dtype,
        )
        return [model]

    def load_models(self, policy, ref_model, regularizer):
        """Load the policy (if None), check the context window, freeze the reference (default: a copy of the policy)
        and build the regularizer; returns the policy, still without LoRA."""
        c = self.config
        policy = policy if policy is not None else load_causal_lm(c.model_name_or_path, **c.model_kwargs)
        check_context(policy, self.prompt_ids + (self.eval_set.ids if self.eval_set else []), c.response_length)
        if ref_model is None and c.use_peft:  # the policy's base with adapters disabled (set in prepare_training)
            self.ref_model = None
        else:
            self.ref_model = (ref_model if ref_model is not None else frozen_copy(policy)).eval().requires_grad_(False)
        reference = self.ref_model if self.ref_model is not None else policy  # policy: still without LoRA here
        self.regularizer = regularizer if regularizer is not None else regularizer_from_config(c, reference)
        return policy

    @property
    def rewards(self) -> dict[str, Reward]:
        """The rewards by unique name."""
        return self.reward_sum.rewards

    @property
    def reward(self) -> Reward:
        """The first (with one reward function: the only) reward, for code that scores with one reward."""
        return next(iter(self.rewards.values()))

    @property
    def beta(self) -> float:
        """The penalty coefficient of the next step (:class:`~otalign.trainers.beta.BetaController`)."""
        return self.beta_controller.value

    def prepare_training(self, policy, *others):
        """LoRA on ``policy`` (if configured), devices, eval mode, AdamW over all trainable parameters,
        ``accelerator.prepare``, the schedule and the beta controller's checkpoint registration."""
        c = self.config
        if c.use_peft:
            policy = apply_lora(
                policy, r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout, target_modules=c.lora_target_modules
            )
        device = self.accelerator.device
        self.ref_model = self.ref_model.to(device) if self.ref_model is not None else AdapterDisabled(policy)
        for reward in self.rewards.values():
            if hasattr(reward, "model"):
                reward.model.to(device)
        models = (policy, *others)
        for model in models:
            model.eval()  # dropout off for rollouts and updates alike (standard for RLHF)
        self.params = [p for m in models for p in m.parameters() if p.requires_grad]
        prepared = self.prepare(*models, self.create_optimizer(self.params))
        self.optimizer = prepared[-1]
        self.count_examples(len(self.prompt_ids) * self.num_generations)
        self.scheduler = self.create_scheduler(self.optimizer)
        self.accelerator.register_for_checkpointing(self.beta_controller)
        return prepared[:-1]

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` steps (resuming if asked); returns the metrics of the steps run."""
        c, acc = self.config, self.accelerator
        history = []
        start = self.begin()
        self.print(
            f"{self.algorithm_name}: {c.max_steps} steps x {c.step_batch_size * acc.num_processes} "
            f"rollouts ({self.num_generations} per prompt), regularizer={self.regularizer!r} in the {c.penalty_in}, "
            f"beta={self.beta}, device={acc.device}, processes={acc.num_processes}"
        )
        self.unconverged_steps = 0
        for step in self.steps(start):
            timer = Timer(acc.device)
            with torch.no_grad():
                rollout, rows = self.sample(step)
                timer.lap("generation")
                scored = self.score_rollout(rollout, rows, timer)
                batch = self.advantages(scored)
                timer.lap("forward")
            metrics = {**self.rollout_metrics(scored), **self.batch_metrics(batch)}
            finite = self.guard.passes(step)  # log-probabilities, rewards and penalty of the rollout
            self.check_convergence(step, metrics)
            if finite:
                metrics.update(self.update(step, batch))
            else:  # on_nonfinite skip: none of the step's optimizer steps
                self.skip_optimizer_steps(self.optimizer_steps_per_step)
                metrics.update(self.advance())
            timer.lap("update")
            metrics.update(timer.metrics())
            if self.evaluate_now(step) or (step == c.max_steps and self.evaluate_at_end):
                metrics.update(self.evaluate())
            history.append(metrics)
            self.log_rollout(step, batch)
            self.end_rl_step(step, metrics)
        if self.unconverged_steps:
            self.print(f"Sinkhorn stopped unconverged in {self.unconverged_steps} of the {len(history)} steps run")
        if c.save_model:
            self.save_model()
        self.finish()
        return history

    # ------------------------------------------------------------------ the algorithm's interface
    @property
    def num_epochs(self) -> int:
        """Passes of :meth:`update` over each rollout batch."""
        raise NotImplementedError

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps per rollout: ``num_epochs x num_mini_batches`` (the schedule counts these, as TRL's)."""
        return self.num_epochs * self.config.num_mini_batches

    def advantages(self, scored: ScoredRollout) -> RolloutBatch:
        """Under no grad: the :class:`RolloutBatch` the algorithm's :meth:`loss` needs."""
        raise NotImplementedError

    def loss(self, batch: RolloutBatch, rows: torch.Tensor, normalizer: float):
        """``(loss, losses, sums)`` of micro-batch ``rows`` (see :meth:`update`)."""
        raise NotImplementedError

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """The algorithm's own metrics of the step (over all processes)."""
        return {}

    def log_rollout(self, step: int, batch: RolloutBatch) -> None:
        """Record the step's samples where the config asks (GRPO/RLOO's ``log_completions``); nothing by default."""

    def normalizers(self, batch: RolloutBatch, micro: tuple[torch.Tensor, ...]) -> list[float]:
        """The normalizer Z of each micro-batch (rows ``micro[k]``) of one mini-batch: by default the ``units`` of the
        whole global mini-batch over the process count (a token mean over the global mini-batch with token-count
        units), the same for each of its micro-batches."""
        acc = self.accelerator
        total = float(pm.global_sum(batch.units[torch.cat(micro)].sum(), acc))
        return [max(total / acc.num_processes, 1e-12)] * len(micro)

    # ------------------------------------------------------------------ 1. sample
    def batch_indices(self) -> list[int]:
        """Global sample indices of this process's rollouts for the next step (from ``state.samples_seen``)."""
        acc, b = self.accelerator, self.config.step_batch_size
        start = self.state.samples_seen + acc.process_index * b
        return list(range(start, start + b))

    def prompt_of(self, index: int) -> int:
        """Prompt row of prompt position ``index``: epoch-wise seeded permutations of the prompt set."""
        n = len(self.prompt_ids)
        epoch, offset = divmod(index, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(self.config.seed, epoch)))
        return int(order[offset])

    def sample(self, step: int) -> tuple[Rollout, list[int]]:
        """This process's rollouts for ``step`` and their prompt rows (sample ``i`` answers position
        ``i // num_generations`` with seed ``(seed, i)``).

        Raises:
            NonFiniteError: the policy's logits at sampling are not finite, naming the step and the likely cause
                (the weights the last update produced: unlike a non-finite loss or gradient, this is found only
                after that update was applied and possibly checkpointed).
        """
        c = self.config
        indices = self.batch_indices()
        rows = [self.prompt_of(i // self.num_generations) for i in indices]
        policy = self.accelerator.unwrap_model(self.policy)
        try:
            rollout = generate(
                policy,
                self.tokenizer,
                [self.prompt_ids[r] for r in rows],
                [self.prompt_texts[r] for r in rows],
                sample_seeds(c.seed, indices),
                c.sampling,
            )
        except NonFiniteError as err:
            later = " (the previous update made these weights, and a checkpoint saved after it has them too)"
            raise NonFiniteError(f"step {step}: {err}; {self.divergence_cause()}{later * self._updated}") from None
        return rollout, rows

    # ------------------------------------------------------------------ 2. score
    @torch.no_grad()
    def score_rollout(self, rollout: Rollout, rows: list[int], timer: Timer) -> ScoredRollout:
        """One scoring pass in chunks of ``scoring_batch_size`` rollouts, then the rewards (:class:`ScoredRollout`)."""
        c = self.config
        causes = {
            "policy logits": self.divergence_cause(),
            "reference logits": "the reference model's weights or dtype",
            "penalty": f"regularizer {getattr(self.regularizer, 'name', self.regularizer)!r} gave it; "
            + self.divergence_cause(),
        }

        def check(quantity: str, value: torch.Tensor) -> None:
            logits = quantity.endswith("logits")
            self.guard.watch(f"the {quantity}", value, causes[quantity], logits=logits, fatal=logits)

        scores = score_rollout(
            self.accelerator.unwrap_model(self.policy),
            self.ref_model,
            rollout,
            self.regularizer,
            temperature=c.temperature,
            chunk_size=c.scoring_chunk,
            support_gradient=self.placement.needs_support_gradient,
            check=check,
            lap=timer.lap,
        )
        columns = {name: [self.prompt_rows[r][name] for r in rows] for name in self.column_names}
        total, components = self.reward_sum(rollout, rows, columns, self.tokenizer.pad_token_id, self.guard.watch)
        return ScoredRollout(
            rollout,
            rows,
            scores.old_logprobs,
            scores.ref_logprobs,
            scores.kl,
            scores.entropy,
            scores.penalty,
            total,
            components,
            scores.gradient,
        )

    def sequence_rewards(self, scored: ScoredRollout) -> torch.Tensor:
        """(B,) score minus the placement's beta times the summed per-token penalty (0 with the penalty in the loss)."""
        beta = self.placement.reward_beta(self.beta)
        if not beta:
            return scored.scores
        return scored.scores - beta * (scored.penalty.per_token * scored.mask).sum(1)

    def penalty_loss(self, batch: RolloutBatch, rows, logits, logprobs, normalizer: float) -> torch.Tensor:
        """The placement's loss term for micro-batch ``rows`` with the batch's loss weights (zero with the penalty in
        the reward); ``logits`` (b, T, V) tempered and ``logprobs`` (b, T) of the current policy, with grad."""
        weights = batch.weights[rows]
        return self.placement.loss(batch.scored, rows, logits, logprobs, weights, normalizer, self.beta)

    # ------------------------------------------------------------------ 4. update
    def update(self, step: int, batch: RolloutBatch) -> dict[str, float]:
        """:attr:`num_epochs` passes over ``num_mini_batches`` shuffled mini-batches, one optimizer step each.

        Each micro-batch's :meth:`loss` returns ``(loss, losses, sums)``: ``loss`` to back-propagate, ``losses``
        named parts already divided by the micro-batch's normalizer (:meth:`normalizers`), ``sums`` statistics
        summed over the micro-batch's generated tokens.

        Returns:
            Losses averaged over the applied optimizer steps and processes, statistics per token (the
            :data:`~otalign.trainers.ppo_math.EXTREMES`: the mean over the micro-batches of the minimum or maximum over
            their responses on all processes), ``learning_rate``
            and ``grad_norm`` (:meth:`~otalign.trainers.base.BaseTrainer.advance`); with ``on_nonfinite: skip``,
            steps skipped for a non-finite loss or gradient are left out.
        """
        c, acc, mask = self.config, self.accelerator, batch.scored.mask
        losses: dict[str, float] = {}
        sums: dict[str, float] = {}
        extremes: dict[str, list[float]] = {}
        tokens, updates = 0.0, 0
        gen = torch.Generator().manual_seed(stream_seed(c.seed, step))
        for _ in range(self.num_epochs):
            order = torch.randperm(mask.shape[0], generator=gen).to(mask.device)
            for minibatch in order.chunk(c.num_mini_batches):
                micro = minibatch.chunk(c.gradient_accumulation_steps)
                update_losses: dict[str, float] = {}
                update_sums: dict[str, float] = {}
                update_extremes: dict[str, list[float]] = {}
                for k, (rows, normalizer) in enumerate(zip(micro, self.normalizers(batch, micro), strict=True)):
                    with self.no_sync(last=k == len(micro) - 1):
                        loss, parts, stats = self.loss(batch, rows, normalizer)
                        self.guard.watch("the loss", loss, self.divergence_cause())
                        acc.backward(loss)
                    for name, value in parts.items():
                        update_losses[name] = update_losses.get(name, 0.0) + float(value)
                    for name, value in stats.items():
                        if name in pm.EXTREMES:
                            extreme = response_extreme(value, pm.EXTREMES[name], acc)
                            update_extremes.setdefault(name, []).append(extreme)
                        else:
                            update_sums[name] = update_sums.get(name, 0.0) + float(value)
                if self.apply_gradients(step):  # a skipped step's (non-finite) losses are not averaged in
                    for name, value in update_losses.items():
                        losses[name] = losses.get(name, 0.0) + value
                    for name, value in update_sums.items():
                        sums[name] = sums.get(name, 0.0) + value
                    for name, values in update_extremes.items():
                        extremes.setdefault(name, []).extend(values)
                    tokens += float(mask[minibatch].sum())
                    updates += 1
        optimizer_metrics = self.advance()
        totals = pm.global_sum(torch.tensor([*losses.values(), *sums.values(), tokens]), acc)
        metrics = {name: float(totals[i]) / (updates * acc.num_processes) for i, name in enumerate(losses)}
        offset = len(losses)
        metrics.update({name: float(totals[offset + i] / totals[-1].clamp_min(1)) for i, name in enumerate(sums)})
        for name, values in extremes.items():  # TRL: the mean of the logged micro-batch values, NaNs left out
            finite = [v for v in values if not math.isnan(v)]
            metrics[name] = sum(finite) / len(finite) if finite else float("nan")
        metrics.update(optimizer_metrics)
        return metrics

    # ------------------------------------------------------------------ held-out evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The policy on the held-out prompts (``eval_dataset_name`` or ``eval_prompts``), one response per prompt
        with the training sampling settings and per-prompt seeds from ``seed`` (the same at every evaluation), by
        :func:`otalign.eval.policy.evaluate_policy` in batches of ``per_device_eval_batch_size`` prompts.

        Returns:
            TRL's ``eval_reward`` (mean of the rewards' weighted sum, as ``reward``) and ``eval_reward_std``
            (unbiased); ``eval_kl/exact`` (exact KL to the reference per generated token), the regularizer's
            statistics per generated token with the prefix ``eval_`` (``eval_penalty/mean``, ``eval_rkl/exact``,
            ``eval_wasserstein/value``, ...), ``eval_regularizer/distance`` (its distance statistic, as
            ``regularizer/distance``) and ``eval_completions/mean_length``. Every process evaluates all prompts.

        Raises:
            ValueError: no held-out prompts.
        """
        from otalign.eval.policy import evaluate_policy

        c, ev = self.config, self.eval_set
        if ev is None:
            raise ValueError("evaluation needs held-out prompts: set eval_dataset_name or pass eval_prompts")
        pad = self.tokenizer.pad_token_id

        def reward(rollout, rows, columns):
            return self.reward_sum(rollout, rows, columns, pad)[0]

        result = evaluate_policy(
            self.accelerator.unwrap_model(self.policy),
            self.ref_model,
            self.tokenizer,
            ev.texts,
            ev.ids,
            reward,
            params=c.sampling,
            seed=c.seed,
            batch_size=c.eval_batch_size,
            scoring_batch_size=c.scoring_chunk,
            columns={name: [row[name] for row in ev.rows] for name in ev.columns},
            regularizer=self.regularizer,
        )
        scores = torch.tensor(result.scores, dtype=torch.float64)
        tokens = max(sum(result.lengths), 1)
        metrics = {
            "reward": float(scores.mean()),
            "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            **result.stats,
            "kl/exact": sum(result.kl) / tokens,
            "completions/mean_length": sum(result.lengths) / len(result.lengths),
        }
        key = distance_key(self.regularizer)
        metrics["regularizer/distance"] = metrics.get(key, metrics.get("penalty/mean", float("nan")))
        return {f"{EVAL_PREFIX}{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------ 5. log, beta, checkpoint
    def rollout_metrics(self, scored: ScoredRollout) -> dict[str, float]:
        """Rollout statistics over all processes, ``beta`` and ``regularizer/distance`` (:func:`rollout_metrics`),
        and TRL's ``num_tokens``: prompt and response tokens sampled so far by all processes
        (``state.num_input_tokens_seen``, saved with checkpoints)."""
        acc = self.accelerator
        metrics = rollout_metrics(scored, self.beta, distance_key(self.regularizer), acc, self.tokenizer.eos_token_id)
        self.state.num_input_tokens_seen += int(pm.global_sum(scored.rollout.attention_mask.sum(), acc))
        metrics["num_tokens"] = float(self.state.num_input_tokens_seen)
        return metrics

    def check_convergence(self, step: int, metrics: dict[str, float]) -> None:
        """Count a step whose solves did not all converge and warn on the first one of the run
        (:func:`~otalign.trainers.rl_metrics.report_convergence`).

        Raises:
            ConvergenceError: with ``wpr_strict``, before the step's update.
        """
        self.unconverged_steps += report_convergence(
            step, metrics, self.config, first=not self.unconverged_steps, warn=self.accelerator.is_main_process
        )

    def end_rl_step(self, step: int, metrics: dict[str, float]) -> None:
        """Move the adaptive beta by the step's measured distance, then log and checkpoint (:meth:`end_step`)."""
        n = self.config.step_batch_size * self.accelerator.num_processes
        self.beta_controller.update(metrics["regularizer/distance"], n)
        self.end_step(step, metrics)


__all__ = [
    "LOSS_POTENTIALS",
    "PENALTY_IN",
    "BetaController",
    "RLConfig",
    "RLTrainer",
    "RolloutBatch",
    "ScoredRollout",
    "check_context",
    "distance_key",
    "k3",
    "regularizer_from_config",
]
