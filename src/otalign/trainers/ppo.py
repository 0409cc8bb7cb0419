r"""PPO with a pluggable per-token regularizer (WPR paper, Algorithm 2): ``PPOConfig`` and ``PPOTrainer``.

One step, read top to bottom in :meth:`PPOTrainer.train`:

1. **Rollout** (no grad): sample a response per prompt from the current policy; run the policy and the
   frozen reference on it; the regularizer turns both logits into a penalty per generated token (only
   these (B, T) values are kept); score the responses with the reward; critic values.
2. **Advantages**: per-token reward :math:`r_t = -\beta\,\text{penalty}_t` plus the score at the last token;
   GAE (:math:`\gamma = 1, \lambda = 0.95`); advantages whitened over the whole data-parallel batch.
3. **Update**: ``num_ppo_epochs`` passes over ``num_mini_batches`` mini-batches (each accumulated over
   ``gradient_accumulation_steps`` micro-batches) minimising the clipped surrogate plus ``vf_coef`` times
   the clipped value loss; losses are token means over the global mini-batch.

The policy distribution is ``softmax(logits / temperature)`` everywhere (ratios, penalty, KL), as in TRL.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from otalign.data import Prompt, load_prompts, render_prompt
from otalign.models import ValueModel, apply_lora, frozen_copy, load_causal_lm, load_tokenizer
from otalign.regularizers import KL_ESTIMATORS, REGULARIZERS, build_regularizer, embedding_matrix
from otalign.regularizers.embeddings import EMBEDDING_SOURCES
from otalign.regularizers.wasserstein import METRICS, TRANSPORTS
from otalign.rewards import REWARD_FUNCTIONS, Reward, build_reward

from . import ppo_math as pm
from .base import BaseTrainer
from .config import ConfigError, TrainerConfig, redefault
from .rollout import Rollout, SamplingParams, encode_prompts, generate, response_logits, response_values, sample_seeds

DEFAULT_BETA = {name: REGULARIZERS.default(name, "beta") for name in REGULARIZERS}
"""beta per regularizer when the config leaves it unset (registered in :data:`otalign.regularizers.REGULARIZERS`)."""

MAX_STATS = ("sinkhorn/iters", "sinkhorn/marginal_err")
"""Regularizer statistics reduced by maximum across processes (the others are token-weighted means)."""


@dataclass
class PPOConfig(TrainerConfig):
    """PPO hyperparameters (defaults: WPR paper Table 9) on top of :class:`TrainerConfig`.

    Batches as TRL's ``PPOConfig``: a rollout has ``per_device_train_batch_size * gradient_accumulation_steps *
    num_mini_batches`` prompts per process (:attr:`step_batch_size`), each optimizer step one mini-batch of
    ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size``. The Wasserstein fields are
    those of :class:`otalign.regularizers.WassersteinRegularizer` (lam, top_k, metric, knn, transport, ...).
    """

    output_dir: str = redefault(TrainerConfig, "output_dir", "runs/ppo")
    prompts: str = field(default="builtin", metadata={"help": "'builtin' or a .jsonl/.json/.txt prompt file"})
    prompts_split: str = field(default="train", metadata={"help": "split of the built-in prompts (train or test)"})
    use_chat_template: bool = field(
        default=True, metadata={"help": "wrap each prompt as a user turn when the tokenizer has a chat template"}
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "longest prompt in tokens (longer is an error)", "check": ">= 1"}
    )
    response_length: int = field(
        default=256, metadata={"help": "new tokens sampled per response at most", "check": ">= 1"}
    )
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature", "check": "> 0"})
    top_k: int = field(default=50, metadata={"help": "sample from the top-k tokens (0: all)", "check": ">= 0"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass", "check": "(0, 1]"})
    critic_model_name_or_path: str | None = field(
        default=None, metadata={"help": "critic backbone, e.g. the reward model (none: the policy's weights)"}
    )
    critic_freeze_backbone: bool = field(
        default=False, metadata={"help": "train only the critic's value head (the backbone runs without grad)"}
    )
    reward_fn: str | None = field(
        default="sentiment",
        metadata={"help": "built-in reward function (none with a reward model)", "choices": REWARD_FUNCTIONS.names},
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "sequence-classification reward model (set reward_fn none)"}
    )
    reward_retokenize: bool = field(
        default=False, metadata={"help": "let a reward model with another tokenizer score re-tokenized text"}
    )
    regularizer: str = field(
        default="rkl", metadata={"help": "per-token penalty of the policy", "choices": REGULARIZERS.names}
    )
    beta: float | None = field(
        default=None, metadata={"help": "penalty coefficient (none: the regularizer's default)", "check": ">= 0"}
    )
    f_alpha: float = field(default=0.5, metadata={"help": "alpha of the alpha-divergence", "check": "(0, 1)"})
    kl_estimator: str = field(
        default="k1", metadata={"help": "KL estimator of the sampled token (rkl only)", "choices": KL_ESTIMATORS}
    )
    wpr_lambda: float = field(default=100.0, metadata={"help": "WPR entropic scale lambda (1/epsilon)", "check": "> 0"})
    wpr_top_k: int = field(
        default=128, metadata={"help": "tokens of each distribution in the WPR support", "check": ">= 1"}
    )
    wpr_metric: str = field(default="euclidean", metadata={"help": "WPR token cost", "choices": METRICS})
    wpr_knn: int | None = field(
        default=None, metadata={"help": "sparse k-nearest-neighbour cost graph (none: dense)", "check": ">= 1"}
    )
    wpr_embeddings: str = field(
        default="input", metadata={"help": "reference embeddings defining the cost", "choices": EMBEDDING_SOURCES}
    )
    wpr_transport: str = field(default="smooth", metadata={"help": "WPR transport form", "choices": TRANSPORTS})
    wpr_smooth_tau: float | None = field(
        default=None,
        metadata={"help": "WPR smooth-form tau in cost units (none: 5% of mean embedding distance)", "check": "> 0"},
    )
    wpr_debias: bool = field(default=False, metadata={"help": "debiased (Sinkhorn divergence) WPR penalty"})
    wpr_max_iter: int = field(default=1000, metadata={"help": "Sinkhorn iterations at most", "check": ">= 1"})
    wpr_tol: float = field(default=1e-5, metadata={"help": "Sinkhorn marginal tolerance", "check": "> 0"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount", "check": "[0, 1]"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda", "check": "[0, 1]"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip", "check": "> 0"})
    cliprange_value: float | None = field(default=0.2, metadata={"help": "value clip (none: off)", "check": "> 0"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight", "check": ">= 0"})
    num_ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout batch", "check": ">= 1"})
    num_mini_batches: int = field(default=1, metadata={"help": "optimizer steps per pass", "check": ">= 1"})
    whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages over the global batch"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten per-token rewards over the global batch"})
    reward_clip: float | None = field(
        default=None, metadata={"help": "clip scores to [-reward_clip, reward_clip] (none: off)", "check": "> 0"}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "subtracted from the score of a response without EOS (none: off)"}
    )
    save_model: bool = field(default=True, metadata={"help": "write the trained policy to output_dir/model"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward_model_name_or_path is None and self.reward_fn is None:
            raise ConfigError("set reward_fn (a built-in reward function) or reward_model_name_or_path", "reward_fn")
        if self.reward_model_name_or_path is not None and self.reward_fn is not None:
            raise ConfigError("set reward_fn: null when using reward_model_name_or_path (one reward only)")

    @property
    def step_batch_size(self) -> int:
        """Prompts per process per rollout: ``per_device_train_batch_size * gradient_accumulation_steps *
        num_mini_batches``."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches

    @property
    def beta_value(self) -> float:
        """``beta`` or the regularizer's default."""
        return REGULARIZERS.default(self.regularizer, "beta") if self.beta is None else self.beta

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.response_length, self.temperature, self.top_k, self.top_p)


def regularizer_from_config(config: PPOConfig, ref_model):
    """The config's regularizer; Wasserstein takes its cost embeddings from ``ref_model``."""
    if config.regularizer == "wasserstein":
        return build_regularizer(
            "wasserstein",
            embeddings=embedding_matrix(ref_model, source=config.wpr_embeddings).float(),
            lam=config.wpr_lambda,
            top_k=config.wpr_top_k,
            metric=config.wpr_metric,
            knn=config.wpr_knn,
            transport=config.wpr_transport,
            smooth_tau=config.wpr_smooth_tau,
            debias=config.wpr_debias,
            max_iter=config.wpr_max_iter,
            tol=config.wpr_tol,
        )
    kwargs = {"alpha": config.f_alpha} if config.regularizer == "alpha" else {}
    if config.regularizer in ("kl", "rkl"):
        kwargs["estimator"] = config.kl_estimator
    return build_regularizer(config.regularizer, **kwargs)


def check_context(model, prompt_ids: list[list[int]], response_length: int) -> None:
    """``ValueError`` if the longest prompt plus ``response_length`` exceeds the model's context window."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max(len(ids) for ids in prompt_ids)
    if limit is not None and longest + response_length > limit:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus response_length={response_length} exceeds the model's "
            f"context of {limit} tokens; shorten the prompts or response_length"
        )


class PPOTrainer(BaseTrainer):
    """PPO trainer for a causal LM policy with any :mod:`otalign.regularizers` penalty.

    Everything not passed in is built from the config (models from ``model_name_or_path``):

    Args:
        config: :class:`PPOConfig`.
        policy: causal LM to train (before LoRA is applied).
        ref_model: frozen reference (default: a frozen copy of ``policy`` as given).
        critic: :class:`otalign.models.ValueModel` (default: backbone copied from the reference).
        tokenizer: the policy's tokenizer.
        reward: an :class:`otalign.rewards.Reward`, or a callable ``fn(prompts, responses) -> scores``.
        regularizer: any object with ``penalty(policy_logits, ref_logits, actions, mask)``.
        prompts: training prompts (strings or message lists) instead of ``config.prompts``.
        accelerator: an existing ``accelerate.Accelerator``.

    Raises:
        ValueError: bad prompts (empty set, too long for ``max_prompt_length`` or the context window),
            unknown reward or regularizer, a reward model with another tokenizer: all before training.
    """

    progress_keys = ("reward/mean", "kl/exact", "penalty/mean")

    def __init__(
        self,
        config: PPOConfig,
        *,
        policy=None,
        ref_model=None,
        critic=None,
        tokenizer=None,
        reward=None,
        regularizer=None,
        prompts: list[Prompt] | None = None,
        accelerator=None,
    ) -> None:
        super().__init__(config, accelerator)
        c = config
        raw_prompts = load_prompts(c.prompts, c.prompts_split) if prompts is None else list(prompts)
        if not raw_prompts:
            raise ValueError("the prompt set is empty")
        self.tokenizer = tokenizer or load_tokenizer(c.model_name_or_path)
        self.prompt_texts = [
            render_prompt(p, self.tokenizer, use_chat_template=c.use_chat_template) for p in raw_prompts
        ]
        self.prompt_ids = encode_prompts(self.tokenizer, self.prompt_texts, max_prompt_length=c.max_prompt_length)

        policy = policy if policy is not None else load_causal_lm(c.model_name_or_path, dtype=c.model_dtype)
        check_context(policy, self.prompt_ids, c.response_length)
        self.ref_model = (ref_model if ref_model is not None else frozen_copy(policy)).eval().requires_grad_(False)
        if critic is None:
            path = c.critic_model_name_or_path
            frozen = c.critic_freeze_backbone
            critic = (
                ValueModel.from_pretrained(path, dtype=c.model_dtype, freeze_backbone=frozen)
                if path
                else ValueModel.from_causal_lm(policy, freeze_backbone=frozen)
            )
        if c.use_peft:
            policy = apply_lora(
                policy, r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout, target_modules=c.lora_target_modules
            )
        if reward is None:
            reward = build_reward(
                c.reward_fn,
                c.reward_model_name_or_path,
                policy_tokenizer=self.tokenizer,
                retokenize=c.reward_retokenize,
                dtype=c.model_dtype,
            )
        self.reward = reward if isinstance(reward, Reward) else build_reward(reward)
        self.regularizer = regularizer if regularizer is not None else regularizer_from_config(c, self.ref_model)
        self.beta = c.beta_value

        device = self.accelerator.device
        self.ref_model.to(device)
        if hasattr(self.reward, "model"):
            self.reward.model.to(device)
        policy.eval()  # dropout off for rollouts and updates alike (standard for RLHF PPO)
        critic.eval()
        params = [p for m in (policy, critic) for p in m.parameters() if p.requires_grad]
        optimizer = self.create_optimizer(params)
        self.policy, self.critic, self.optimizer = self.prepare(policy, critic, optimizer)
        self.scheduler = self.create_scheduler(self.optimizer)
        self.params = params

    # ------------------------------------------------------------------ data
    def batch_indices(self) -> list[int]:
        """Global sample indices of this process's prompts for the next step (from ``state.samples_seen``)."""
        acc, b = self.accelerator, self.config.step_batch_size
        start = self.state.samples_seen + acc.process_index * b
        return list(range(start, start + b))

    def prompt_of(self, index: int) -> int:
        """Prompt id of global sample ``index``: epoch-wise seeded permutations of the prompt set."""
        n = len(self.prompt_ids)
        epoch, offset = divmod(index, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
        return int(order[offset])

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` PPO steps (resuming if asked); returns the metrics of the steps run."""
        c, acc = self.config, self.accelerator
        history = []
        start = self.begin()
        self.print(
            f"PPO: {c.max_steps} steps x {c.step_batch_size * acc.num_processes} rollouts, "
            f"regularizer={self.regularizer!r}, beta={self.beta}, device={acc.device}, processes={acc.num_processes}"
        )
        for step in self.steps(start):
            timer = Timer(acc.device)
            # 1. rollout: sample, then score every token under no_grad; keep only (B, T) tensors.
            indices = self.batch_indices()
            ids = [self.prompt_of(i) for i in indices]
            policy, critic = acc.unwrap_model(self.policy), acc.unwrap_model(self.critic)
            with torch.no_grad():
                rollout = generate(
                    policy,
                    self.tokenizer,
                    [self.prompt_ids[i] for i in ids],
                    [self.prompt_texts[i] for i in ids],
                    sample_seeds(c.seed, indices),
                    c.sampling,
                )
                mask = rollout.response_mask
                timer.lap("generation")
                policy_logits = response_logits(policy, rollout) / c.temperature
                ref_logits = response_logits(self.ref_model, rollout) / c.temperature
                old_logprobs = policy_logits.log_softmax(-1).gather(-1, rollout.responses[..., None]).squeeze(-1)
                kl, entropy = pm.kl_and_entropy(policy_logits, ref_logits)
                timer.lap("forward")
                penalty = self.regularizer.penalty(policy_logits, ref_logits, rollout.responses, mask)
                del policy_logits, ref_logits
                timer.lap("penalty")
                old_values = response_values(critic, rollout)
                scores = self.score(rollout)
                rewards = pm.token_rewards(penalty.per_token, scores, mask, self.beta)
                if c.whiten_rewards:
                    rewards = pm.whiten(rewards, mask, acc, shift_mean=False)
                advantages, returns = pm.gae(rewards, old_values, mask, gamma=c.gamma, lam=c.lam)
                if c.whiten_advantages:
                    advantages = pm.whiten(advantages, mask, acc)
                timer.lap("forward")

            # 2. update: clipped policy + value losses, token means over the global mini-batch.
            sums = {"loss/policy": 0.0, "loss/value": 0.0, "policy/clipfrac": 0.0, "policy/approx_kl": 0.0}
            sums["value/clipfrac"] = 0.0
            tokens_seen = 0.0
            gen = torch.Generator().manual_seed(c.seed * 7919 + step)
            for _ in range(c.num_ppo_epochs):
                order = torch.randperm(mask.shape[0], generator=gen).to(mask.device)
                for minibatch in order.chunk(c.num_mini_batches):
                    normalizer = float(pm.global_sum(mask[minibatch].sum(), acc)) / acc.num_processes
                    micro = minibatch.chunk(c.gradient_accumulation_steps)
                    for k, rows in enumerate(micro):
                        with self.no_sync(last=k == len(micro) - 1):
                            logits = response_logits(self.policy, rollout, rows) / c.temperature
                            logprobs = pm.token_logprobs(logits, rollout.responses[rows])
                            values = response_values(self.critic, rollout, rows)
                            pg, pg_stats = pm.policy_loss(
                                logprobs,
                                old_logprobs[rows],
                                advantages[rows],
                                mask[rows],
                                cliprange=c.cliprange,
                                normalizer=normalizer,
                            )
                            vf, vf_stats = pm.value_loss(
                                values,
                                old_values[rows],
                                returns[rows],
                                mask[rows],
                                cliprange_value=c.cliprange_value,
                                normalizer=normalizer,
                            )
                            acc.backward(pg + c.vf_coef * vf)
                        sums["loss/policy"] += float(pg.detach()) * normalizer
                        sums["loss/value"] += float(vf.detach()) * normalizer
                        for name, value in {**pg_stats, **vf_stats}.items():
                            sums[name] += float(value)
                        tokens_seen += float(mask[rows].sum())
                    if c.max_grad_norm is not None:
                        acc.clip_grad_norm_(self.params, c.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.state.samples_seen += c.step_batch_size * acc.num_processes
            timer.lap("update")

            # 3. metrics over the whole data-parallel batch.
            metrics = self.rollout_metrics(rollout, scores, penalty, kl, entropy, old_values, returns)
            totals = pm.global_sum(torch.tensor([*sums.values(), tokens_seen]), acc)
            metrics.update({name: float(totals[i] / totals[-1].clamp_min(1)) for i, name in enumerate(sums)})
            metrics["lr"] = lr
            metrics.update(timer.metrics())
            history.append(metrics)
            self.end_step(step, metrics)
        if c.save_model:
            self.save_model()
        self.finish()
        return history

    # ------------------------------------------------------------------ helpers
    def score(self, rollout: Rollout) -> torch.Tensor:
        """(B,) reward scores, clipped and with the missing-EOS penalty as configured."""
        c = self.config
        ids, mask = rollout.right_aligned(self.tokenizer.pad_token_id)
        scores = self.reward(rollout.prompt_texts, rollout.response_texts, ids, mask).float()
        if c.missing_eos_penalty is not None:
            finished = (rollout.responses == self.tokenizer.eos_token_id).any(1)
            scores = scores - c.missing_eos_penalty * (~finished).float()
        if c.reward_clip is not None:
            scores = scores.clamp(-c.reward_clip, c.reward_clip)
        return scores

    def no_sync(self, *, last: bool):
        """Skip the data-parallel gradient all-reduce on all but the last micro-batch of a mini-batch."""
        if last:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.no_sync(self.policy))
        stack.enter_context(self.accelerator.no_sync(self.critic))
        return stack

    def rollout_metrics(self, rollout, scores, penalty, kl, entropy, values, returns) -> dict[str, float]:
        """Rollout statistics, reduced over all processes (token means weighted by token counts)."""
        acc, mask = self.accelerator, rollout.response_mask
        rows = torch.ones_like(scores, dtype=torch.bool)

        def batch_mean(x: torch.Tensor) -> float:
            return float(pm.masked_mean(x, rows, acc))

        def token_mean(x: torch.Tensor) -> float:
            return float(pm.masked_mean(x, mask, acc))

        tokens = float(pm.global_sum(mask.sum(), acc))
        metrics = {
            "reward/mean": batch_mean(scores),
            "reward/std": math.sqrt(float(pm.masked_var(scores, rows, acc))),
            "reward/total": batch_mean(scores - self.beta * (penalty.per_token * mask).sum(1)),
            "penalty/mean": token_mean(penalty.per_token),
            "kl/exact": token_mean(kl),
            "kl/exact_seq": batch_mean((kl * mask).sum(1)),
            "policy/entropy": token_mean(entropy),
            "response/length": batch_mean(mask.sum(1).float()),
            "value/mean": token_mean(values),
            "value/explained_variance": pm.explained_variance(values, returns, mask, acc),
        }
        local_tokens = float(mask.sum())
        for name, value in penalty.stats.items():
            if name in ("penalty/mean", "kl/exact"):
                continue
            if name in MAX_STATS:
                t = torch.tensor(float(value), device=mask.device)
                metrics[name] = float(acc.reduce(t, reduction="max") if acc.num_processes > 1 else t)
            else:
                metrics[name] = float(pm.global_sum(torch.tensor(value * local_tokens), acc)) / max(tokens, 1)
        return metrics


class Timer:
    """Wall-clock laps by name (summed when a name repeats), synchronising CUDA so GPU work is counted."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}
        self.start = self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        self.totals[name] = self.totals.get(name, 0.0) + now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        """``time/<name>`` seconds per lap name and ``time/step`` in total."""
        return {**{f"time/{k}": v for k, v in self.totals.items()}, "time/step": self.last - self.start}
