r"""What every RL trainer (PPO, GRPO, RLOO) shares: ``RLConfig`` and ``RLTrainer``.

One RL step, whatever the algorithm:

1. :meth:`RLTrainer.sample`: one response per global sample index from the current policy; sample ``i``
   answers prompt position ``i // num_generations`` (a group of ``num_generations`` consecutive indices
   shares a prompt, and a process always holds whole groups), with its own sampling seed.
2. :meth:`RLTrainer.score_rollout` (no grad): policy and reference logits on the rollout, the sampled
   tokens' log-probabilities under both, exact full-vocabulary KL and entropy, the regularizer's penalty per
   generated token, the potentials of the loss surrogate when the penalty goes into the loss, and the
   weighted sum of the reward functions (each one's scores kept for logging).
3. The algorithm's advantages (GAE with a critic, or group baselines without one).
4. :meth:`RLTrainer.update`: passes over mini-batches of the rollouts (each accumulated over micro-batches),
   the algorithm's loss plus :meth:`RLTrainer.penalty_loss` when ``penalty_in: loss``.
5. :meth:`RLTrainer.end_rl_step`: log, move the adaptive beta (:class:`BetaController`), checkpoint.

**Guards.** Before any update of a step, the rollout's policy and reference logits, rewards and penalty must be
finite (:class:`~otalign.guard.FiniteGuard`; non-finite logits always stop the run, the rest follow
``on_nonfinite``), and each optimizer step checks its losses and gradient norm
(:meth:`~otalign.trainers.base.BaseTrainer.apply_gradients`). A Sinkhorn solve that stops at ``wpr_max_iter``
above ``wpr_tol`` is counted in ``sinkhorn/unconverged_frac`` and warned about once per run
(:class:`~otalign.guard.ConvergenceWarning`), or stops the run with ``wpr_strict``.

**Where the penalty goes** (``penalty_in``). ``reward``: :math:`-\beta\,\text{penalty}_t` is added to the
per-token reward (WPR paper, Algorithm 2), or summed over the response into the sequence reward of a
critic-free method. ``loss``: :math:`\beta\,d_t` is added to the loss at every generated position, with
:math:`d_t` the k3 estimator :math:`e^{\ell_{ref} - \ell} - (\ell_{ref} - \ell) - 1` for the KL (as GRPO)
and, for every other regularizer, the surrogate :math:`\sum_i \pi_\theta(i\mid\text{ctx})\,\phi_i` whose
gradient is the distance's own (:class:`otalign.regularizers.SupportGradient`, proof there); the potentials
:math:`\phi` come from the rollout policy (``loss_potentials: rollout``, one solve per step) or from the
current policy at every micro-batch (``current``: one more reference forward and solve each time).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from otalign.data import Prompt, load_prompt_rows, prompt_columns, render_prompt, validate_prompt
from otalign.data.prompts import PROMPT_SETS
from otalign.data.reading import numbered
from otalign.generation import Rollout, SamplingParams, encode_prompts, generate, response_logits, sample_seeds
from otalign.guard import ConvergenceError, ConvergenceWarning, NonFiniteError
from otalign.models import AdapterDisabled, apply_lora, context_window, frozen_copy, load_causal_lm, load_tokenizer
from otalign.regularizers import (
    KL_ESTIMATORS,
    LOG_PROB_FLOOR,
    REGULARIZER_NAMES,
    REGULARIZERS,
    PenaltyOutput,
    Regularizer,
    SupportGradient,
    build_regularizer,
    embedding_matrix,
)
from otalign.regularizers.embeddings import EMBEDDING_SOURCES
from otalign.regularizers.wasserstein import METRICS, TRANSPORTS
from otalign.rewards import REWARD_FUNCTIONS, Reward, build_reward

from . import ppo_math as pm
from .base import BaseTrainer
from .config import ConfigError, TrainerConfig, stream_seed
from .metrics import Timer

MAX_STATS = ("sinkhorn/iters", "sinkhorn/marginal_err")
"""Regularizer statistics reduced by maximum across processes (the others, ``sinkhorn/unconverged_frac``
included, are token-weighted means: the share of all generated positions)."""

PENALTY_IN = ("reward", "loss")
LOSS_POTENTIALS = ("rollout", "current")


@dataclass
class RLConfig(TrainerConfig):
    """Fields every RL trainer shares (data, sampling, rewards, regularizer, penalty placement, adaptive beta).

    Batches as TRL's ``PPOConfig``: a rollout has ``per_device_train_batch_size * gradient_accumulation_steps *
    num_mini_batches`` responses per process (:attr:`step_batch_size`), each optimizer step one mini-batch of
    ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size``. The Wasserstein fields are
    those of :class:`otalign.regularizers.WassersteinRegularizer` (lam, top_k, metric, knn, transport, ...).
    """

    prompts: str = field(
        default="builtin",
        metadata={
            "path": "file",
            "builtins": PROMPT_SETS,
            "help": "prompt set: builtin, arithmetic, or a .jsonl/.json/.txt prompt file",
        },
    )
    prompts_split: str = field(default="train", metadata={"help": "split of a built-in prompt set (train or test)"})
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
    reward_fn: list[str] | None = field(
        default_factory=lambda: ["sentiment"],
        metadata={
            "help": "built-in reward function(s), comma-separated and summed (none with a reward model)",
            "choices": REWARD_FUNCTIONS.names,
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "weight of each reward function in the sum (none: all 1)"}
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"path": "model", "help": "sequence-classification reward model (set reward_fn none)"}
    )
    reward_retokenize: bool = field(
        default=False, metadata={"help": "let a reward model with another tokenizer score re-tokenized text"}
    )
    reward_clip: float | None = field(
        default=None, metadata={"help": "clip scores to [-reward_clip, reward_clip] (none: off)", "check": "> 0"}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "subtracted from the score of a response without EOS (none: off)"}
    )
    regularizer: str = field(
        default="rkl", metadata={"help": "per-token penalty of the policy", "choices": REGULARIZERS.names}
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "penalty coefficient (none: the regularizer's default); the start value with beta_target",
            "check": ">= 0",
        },
    )
    beta_target: float | None = field(
        default=None,
        metadata={"help": "adaptive beta: the per-token distance to steer toward (none: fixed beta)", "check": "> 0"},
    )
    beta_horizon: float = field(
        default=10000.0, metadata={"help": "adaptive beta: controller horizon in samples", "check": "> 0"}
    )
    penalty_in: str = field(
        default="reward",
        metadata={
            "help": "where the penalty goes: reward (-beta*penalty per token) or loss (beta*D)",
            "choices": PENALTY_IN,
        },
    )
    loss_potentials: str = field(
        default="rollout",
        metadata={
            "help": "penalty_in loss: surrogate potentials from the rollout policy or the current one",
            "choices": LOSS_POTENTIALS,
        },
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
    wpr_max_iter: int = field(
        default=50,
        metadata={"help": "Sinkhorn iterations before Newton finishes a solve above wpr_tol", "check": ">= 1"},
    )
    wpr_tol: float = field(default=1e-7, metadata={"help": "marginal tolerance (mass units)", "check": "> 0"})
    wpr_overrelaxation: float = field(
        default=1.7,
        metadata={
            "help": "Sinkhorn over-relaxation w (1: plain; 1.5-1.8: same penalty, fewer iterations)",
            "check": "(0, 2)",
        },
    )
    wpr_newton_steps: int = field(
        default=20,
        metadata={
            "help": "Newton steps at most for a Sinkhorn solve above wpr_tol at wpr_max_iter (0: off; not full form)",
            "check": ">= 0",
        },
    )
    wpr_strict: bool = field(
        default=False,
        metadata={"help": "stop the run when a Sinkhorn solve ends above wpr_tol (else: warn once and count)"},
    )
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip", "check": "> 0"})
    num_mini_batches: int = field(default=1, metadata={"help": "optimizer steps per pass", "check": ">= 1"})
    save_model: bool = field(default=True, metadata={"help": "write the trained policy to output_dir/model"})

    def __post_init__(self) -> None:
        if isinstance(self.reward_fn, str):
            self.reward_fn = [name for name in self.reward_fn.split(",") if name]
        super().__post_init__()
        if self.reward_model_name_or_path is None and not self.reward_fn:
            raise ConfigError("set reward_fn (a built-in reward function) or reward_model_name_or_path", "reward_fn")
        if self.reward_model_name_or_path is not None and self.reward_fn:
            raise ConfigError("set reward_fn: null when using reward_model_name_or_path (one reward only)", "reward_fn")

    @property
    def step_batch_size(self) -> int:
        """Responses per process per rollout: ``per_device_train_batch_size * gradient_accumulation_steps *
        num_mini_batches``."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches

    @property
    def beta_value(self) -> float:
        """``beta`` or the regularizer's default."""
        return REGULARIZERS.default(self.regularizer, "beta") if self.beta is None else self.beta

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.response_length, self.temperature, self.top_k, self.top_p)


def regularizer_from_config(config: RLConfig, ref_model) -> Regularizer:
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
            overrelaxation=config.wpr_overrelaxation,
            newton_steps=config.wpr_newton_steps,
        )
    kwargs = {"alpha": config.f_alpha} if config.regularizer == "alpha" else {}
    if config.regularizer in ("kl", "rkl"):
        kwargs["estimator"] = config.kl_estimator
    return build_regularizer(config.regularizer, **kwargs)


def check_context(model, prompt_ids: list[list[int]], response_length: int) -> None:
    """``ValueError`` if the longest prompt plus ``response_length`` exceeds the model's context window."""
    limit = context_window(model)
    longest = max(len(ids) for ids in prompt_ids)
    if limit is not None and longest + response_length > limit:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus response_length={response_length} exceeds the model's "
            f"context of {limit} tokens; shorten the prompts or response_length"
        )


def distance_key(regularizer) -> str:
    """The statistic that measures the regularizer's distance per token: ``wasserstein/value`` for Wasserstein,
    ``<kind>/exact`` for an f-divergence (``rkl/exact`` is the KL), else ``penalty/mean``."""
    name = getattr(regularizer, "name", "")
    if name == "wasserstein":
        return "wasserstein/value"
    return f"{name}/exact" if name in REGULARIZER_NAMES else "penalty/mean"


class BetaController:
    r"""The penalty coefficient: fixed, or steered toward a target distance (Ziegler et al.'s adaptive KL,
    generalised to any regularizer).

    After each step with measured per-token distance :math:`D` and :math:`n` samples:
    :math:`e = \mathrm{clip}(D / D_{target} - 1, -0.2, 0.2)`, :math:`\beta \leftarrow \beta\,(1 + e\,n / H)`.
    Its state is saved in checkpoints (registered with the accelerator), so a resumed run continues the schedule.

    Args:
        beta: the initial value (>= 0).
        target: :math:`D_{target}` > 0, or None for a fixed beta.
        horizon: :math:`H` in samples (> 0).
    """

    def __init__(self, beta: float, target: float | None = None, horizon: float = 10000.0) -> None:
        self.value, self.target, self.horizon = float(beta), target, float(horizon)

    def update(self, distance: float, n_steps: int) -> float:
        """Move beta after a step that measured ``distance`` over ``n_steps`` samples; returns the new beta."""
        if self.target is not None and math.isfinite(distance):
            error = min(max(distance / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class ScoredRollout:
    """A rollout with everything scored under no_grad (B rollouts, T response positions).

    Attributes:
        rollout: the sampled batch. rows: each rollout's prompt row (index into the prompt set).
        old_logprobs, ref_logprobs: (B, T) float32 log-probabilities of the sampled tokens.
        kl, entropy: (B, T) exact full-vocabulary KL(pi || pi_ref) and entropy of pi (nats).
        penalty: the regularizer's :class:`~otalign.regularizers.PenaltyOutput`.
        scores: (B,) weighted sum of the rewards (after the missing-EOS penalty and clipping).
        components: each reward function's (B,) raw scores by name.
        potentials: the loss surrogate's :class:`~otalign.regularizers.SupportGradient` on the (B, T) grid,
            when ``penalty_in: loss`` with rollout potentials and a regularizer other than the KL.
    """

    rollout: Rollout
    rows: list[int]
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    penalty: PenaltyOutput
    scores: torch.Tensor
    components: dict[str, torch.Tensor]
    potentials: SupportGradient | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask


def on_grid(gradient: SupportGradient, mask: torch.Tensor) -> SupportGradient:
    """``gradient`` over the True positions of ``mask`` (B, T) laid out on the (B, T) grid (zeros elsewhere)."""

    def scatter(x):
        if x is None:
            return None
        out = torch.zeros((*mask.shape, *x.shape[1:]), dtype=x.dtype, device=x.device)
        out[mask] = x
        return out

    return SupportGradient(*(scatter(getattr(gradient, name)) for name in ("tokens", "distinct", "phi", "dust")), None)


def rows_of(gradient: SupportGradient, rows: torch.Tensor) -> SupportGradient:
    """The rows ``rows`` of a grid :class:`SupportGradient`."""
    take = [None if x is None else x[rows] for x in (gradient.tokens, gradient.distinct, gradient.phi, gradient.dust)]
    return SupportGradient(*take, None)


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    r"""GRPO's per-token KL estimate :math:`e^{\ell_{ref} - \ell} - (\ell_{ref} - \ell) - 1 \ge 0` (differentiable)."""
    diff = ref_logprobs.clamp_min(LOG_PROB_FLOOR) - logprobs.clamp_min(LOG_PROB_FLOOR)
    return torch.expm1(diff) - diff


def as_rows(prompts: list) -> list[dict]:
    """Prompt rows from Python prompts: strings or message lists (no columns), or dicts with a ``prompt``."""
    return [
        {**p, "prompt": validate_prompt(p, f"prompts[{i}]")} if isinstance(p, dict) else {"prompt": p}
        for i, p in enumerate(prompts)
    ]


class RLTrainer(BaseTrainer):
    """Base of :class:`~otalign.trainers.PPOTrainer` and the critic-free trainers (see the module docstring).

    The constructor loads prompts, tokenizer, rewards, beta, the policy and the reference
    (:meth:`load_models`), the algorithm's own models (:meth:`build_models`), and prepares them all
    (:meth:`prepare_training`); :meth:`train` runs the steps, the algorithm supplying :meth:`advantages`,
    :meth:`loss` and :meth:`batch_metrics`.

    Args:
        config: an :class:`RLConfig`.
        policy: causal LM to train (before LoRA is applied); default: loaded from ``model_name_or_path``.
        ref_model: frozen reference (default: a frozen copy of ``policy`` as given; with ``use_peft`` the policy's
            base with its adapters disabled, :class:`otalign.models.AdapterDisabled`, as TRL: no second copy).
        tokenizer: the policy's tokenizer (default: loaded from ``model_name_or_path``).
        reward: an :class:`otalign.rewards.Reward`, a callable ``fn(prompts, responses, **columns)``, or a list of
            them (summed with ``reward_weights``); default: from the config.
        regularizer: any object with ``penalty(policy_logits, ref_logits, actions, mask)`` (and
            ``support_gradient`` for ``penalty_in: loss`` with a regularizer other than the KL).
        prompts: prompts (strings, message lists, or dicts with ``prompt`` and columns) instead of ``config.prompts``.
        accelerator: an existing ``accelerate.Accelerator``.

    Raises:
        ValueError: bad prompts (empty set, too long for ``max_prompt_length`` or the context window),
            unknown reward or regularizer, a reward model with another tokenizer: all before training.
    """

    num_generations = 1
    """Responses per prompt (a group); the critic-free trainers set it from their config."""

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
        accelerator=None,
    ) -> None:
        super().__init__(config, accelerator)
        c = config
        rows = load_prompt_rows(c.prompts, c.prompts_split) if prompts is None else as_rows(list(prompts))
        if not rows:
            raise ValueError("the prompt set is empty")
        self.prompt_rows = rows
        self.column_names = prompt_columns(rows, c.prompts if prompts is None else "prompts")
        self.tokenizer = tokenizer or load_tokenizer(c.model_name_or_path)
        self.prompt_texts = [
            render_prompt(r["prompt"], self.tokenizer, use_chat_template=c.use_chat_template) for r in rows
        ]
        self.prompt_ids = encode_prompts(
            self.tokenizer,
            self.prompt_texts,
            max_prompt_length=c.max_prompt_length,
            source=c.prompts if prompts is None else "prompts",
            numbers=[i for i, _ in numbered(rows)],
        )
        self.rewards = self.build_rewards(reward)
        weights = c.reward_weights or [1.0] * len(self.rewards)
        if len(weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.rewards)} reward function(s)")
        self.reward_weights = [float(w) for w in weights]
        self.beta_controller = BetaController(c.beta_value, c.beta_target, c.beta_horizon)
        policy = self.load_models(policy, ref_model, regularizer)
        extra = self.build_models(policy)
        self.policy, *prepared = self.prepare_training(policy, *extra.values())
        for name, model in zip(extra, prepared, strict=True):
            setattr(self, name, model)

    # ------------------------------------------------------------------ setup
    def build_models(self, policy) -> dict:
        """Models trained next to the policy, by attribute name (PPO: its critic), built from the policy before
        LoRA; none by default."""
        return {}

    def build_rewards(self, reward) -> dict[str, Reward]:
        """The rewards by unique name, from the ``reward`` argument or the config."""
        c = self.config
        if reward is None:
            given = (
                [build_reward(name) for name in c.reward_fn]
                if c.reward_model_name_or_path is None
                else [
                    build_reward(
                        None,
                        c.reward_model_name_or_path,
                        policy_tokenizer=self.tokenizer,
                        retokenize=c.reward_retokenize,
                        dtype=c.model_dtype,
                    )
                ]
            )
        else:
            given = reward if isinstance(reward, (list, tuple)) else [reward]
            given = [r if isinstance(r, Reward) else build_reward(r) for r in given]
        if not given:
            raise ValueError("no reward: give reward_fn, reward_model_name_or_path or a reward")
        named: dict[str, Reward] = {}
        for r in given:
            name, k = r.name, 2
            while name in named or name in ("mean", "std", "total", "group_std", "zero_std_frac"):
                name, k = f"{r.name}_{k}", k + 1
            named[name] = r
        return named

    def load_models(self, policy, ref_model, regularizer):
        """Load the policy (if None), check the context window, freeze the reference (default: a copy of the policy)
        and build the regularizer; returns the policy, still without LoRA."""
        c = self.config
        policy = policy if policy is not None else load_causal_lm(c.model_name_or_path, dtype=c.model_dtype)
        check_context(policy, self.prompt_ids, c.response_length)
        if ref_model is None and c.use_peft:  # the policy's base with adapters disabled (set in prepare_training)
            self.ref_model = None
        else:
            self.ref_model = (ref_model if ref_model is not None else frozen_copy(policy)).eval().requires_grad_(False)
        reference = self.ref_model if self.ref_model is not None else policy  # policy: still without LoRA here
        self.regularizer = regularizer if regularizer is not None else regularizer_from_config(c, reference)
        if c.penalty_in == "loss" and not self.uses_k3 and not _has_support_gradient(self.regularizer):
            raise ValueError(f"penalty_in=loss needs a regularizer with support_gradient, got {self.regularizer!r}")
        return policy

    @property
    def beta(self) -> float:
        """The penalty coefficient of the next step (:class:`BetaController`)."""
        return self.beta_controller.value

    @property
    def reward(self) -> Reward:
        """The first (with one reward function: the only) reward, for code that scores with one reward."""
        return next(iter(self.rewards.values()))

    @property
    def uses_k3(self) -> bool:
        """The penalty in the loss is the k3 KL estimate (the regularizer is the reverse KL)."""
        return getattr(self.regularizer, "name", None) == "rkl"

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

    # ------------------------------------------------------------------ loop
    algorithm_name = "RL"
    """Name in the start-of-run line."""

    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` steps (resuming if asked); returns the metrics of the steps run.

        Each step: :meth:`sample` and :meth:`score_rollout` (no grad), the algorithm's :meth:`advantages`,
        :meth:`update` over :attr:`num_epochs` passes with the algorithm's :meth:`loss`, metrics over the whole
        data-parallel batch (:meth:`rollout_metrics` and :meth:`batch_metrics`), :meth:`end_rl_step`.
        """
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
            metrics = {**self.rollout_metrics(scored), **self.batch_metrics(scored, batch)}
            finite = self.guard.passes(step)  # logits, rewards and penalty of the rollout
            self.check_convergence(step, metrics)
            if finite:
                loss_of = functools.partial(self.loss, scored, batch)
                metrics.update(self.update(step, scored.mask, self.num_epochs, batch["units"], loss_of))
            else:  # on_nonfinite skip: none of the step's optimizer steps
                self.state.skipped_steps += self.num_epochs * c.num_mini_batches
                metrics.update(self.advance())
            timer.lap("update")
            metrics.update(timer.metrics())
            history.append(metrics)
            self.end_rl_step(step, metrics)
        if self.unconverged_steps:
            self.print(f"Sinkhorn stopped unconverged in {self.unconverged_steps} of the {len(history)} steps run")
        if c.save_model:
            self.save_model()
        self.finish()
        return history

    def check_convergence(self, step: int, metrics: dict[str, float]) -> None:
        """Count a step whose Sinkhorn solves did not all converge (``sinkhorn/unconverged_frac`` > 0, the same on
        every process) and warn on the first one of the run (:class:`~otalign.guard.ConvergenceWarning`).

        Raises:
            ConvergenceError: with ``wpr_strict``, before the step's update.
        """
        share = metrics.get("sinkhorn/unconverged_frac", 0.0)
        if not share > 0:
            return
        c = self.config
        message = (
            f"step {step}: Sinkhorn stopped at wpr_max_iter={c.wpr_max_iter} above wpr_tol={c.wpr_tol:g}, and "
            f"wpr_newton_steps={c.wpr_newton_steps} Newton steps did not finish, at {share:.1%} of the generated "
            f"positions (wpr_lambda={c.wpr_lambda:g}), so their penalties are approximate; raise wpr_max_iter, "
            "wpr_newton_steps or wpr_tol, or lower wpr_lambda"
        )
        if c.wpr_strict:
            raise ConvergenceError(message)
        self.unconverged_steps += 1
        if self.unconverged_steps == 1 and self.accelerator.is_main_process:
            message += " (warned once per run; sinkhorn/unconverged_frac has the share of every step)"
            warnings.warn(message, ConvergenceWarning, stacklevel=2)

    @property
    def num_epochs(self) -> int:
        """Passes of :meth:`update` over each rollout batch."""
        raise NotImplementedError

    def advantages(self, scored: ScoredRollout) -> dict[str, torch.Tensor]:
        """Under no_grad: the tensors :meth:`loss` needs, with ``units`` (B,), the normalizer units of
        :meth:`update`."""
        raise NotImplementedError

    def loss(self, scored: ScoredRollout, batch: dict[str, torch.Tensor], rows: torch.Tensor, normalizer: float):
        """``(loss, losses, sums)`` of micro-batch ``rows`` (see :meth:`update`)."""
        raise NotImplementedError

    def batch_metrics(self, scored: ScoredRollout, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The algorithm's own metrics of the step (over all processes)."""
        return {}

    # ------------------------------------------------------------------ data
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

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_rollout(self, rollout: Rollout, rows: list[int], timer: Timer) -> ScoredRollout:
        """Log-probabilities, exact KL and entropy, penalty (and loss potentials), rewards (:class:`ScoredRollout`)."""
        c = self.config
        policy = self.accelerator.unwrap_model(self.policy)
        mask = rollout.response_mask
        policy_logits = response_logits(policy, rollout) / c.temperature
        ref_logits = response_logits(self.ref_model, rollout) / c.temperature
        self.guard.watch("the policy logits", policy_logits, self.divergence_cause(), logits=True, fatal=True)
        reference = "the reference model's weights or dtype"
        self.guard.watch("the reference logits", ref_logits, reference, logits=True, fatal=True)
        old_logprobs = pm.token_logprobs(policy_logits, rollout.responses)
        ref_logprobs = pm.token_logprobs(ref_logits, rollout.responses)
        kl, entropy = pm.kl_and_entropy(policy_logits, ref_logits)
        timer.lap("forward")
        penalty = self.regularizer.penalty(policy_logits, ref_logits, rollout.responses, mask)
        self.guard.watch(
            "the penalty",
            penalty.per_token,
            f"regularizer {getattr(self.regularizer, 'name', self.regularizer)!r} gave it; {self.divergence_cause()}",
        )
        potentials = None
        if c.penalty_in == "loss" and not self.uses_k3 and c.loss_potentials == "rollout":
            gradient = self.regularizer.support_gradient(policy_logits, ref_logits, rollout.responses, mask)
            potentials = on_grid(gradient, mask)
        del policy_logits, ref_logits
        timer.lap("penalty")
        scores, components = self.score(rollout, rows)
        return ScoredRollout(
            rollout, rows, old_logprobs, ref_logprobs, kl, entropy, penalty, scores, components, potentials
        )

    def score(self, rollout: Rollout, rows: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B,) weighted sum of the rewards (missing-EOS penalty and clipping applied) and each one's scores.

        A non-finite score is left to the step's guard (it names the reward and the prompt rows).

        Raises:
            ValueError: a reward returning the wrong number of scores, naming it.
        """
        c = self.config
        ids, attention = rollout.right_aligned(self.tokenizer.pad_token_id)
        columns = {name: [self.prompt_rows[r][name] for r in rows] for name in self.column_names}
        total = torch.zeros(len(rows), device=ids.device)
        components = {}
        for (name, reward), weight in zip(self.rewards.items(), self.reward_weights, strict=True):
            try:
                scores = reward(rollout.prompt_texts, rollout.response_texts, ids, attention, columns)
            except ValueError as err:  # name the prompt rows behind the batch entries the message counts
                raise ValueError(f"{err} (prompt rows of the batch entries: {rows})") from None
            scores = torch.as_tensor(scores).float().flatten().to(ids.device)
            if scores.numel() != len(rows):
                raise ValueError(f"reward {name!r} returned {scores.numel()} scores for {len(rows)} responses")
            bad = [rows[i] for i in (~torch.isfinite(scores)).nonzero()[:, 0].tolist()]
            self.guard.watch(f"the score of reward {name!r}", scores, f"it returned NaN or inf for prompt rows {bad}")
            components[name] = scores
            total = total + weight * scores
        if c.missing_eos_penalty is not None:
            finished = (rollout.responses == self.tokenizer.eos_token_id).any(1)
            total = total - c.missing_eos_penalty * (~finished).float()
        if c.reward_clip is not None:
            total = total.clamp(-c.reward_clip, c.reward_clip)
        return total, components

    def sequence_rewards(self, scored: ScoredRollout) -> torch.Tensor:
        """(B,) score minus ``beta`` times the summed per-token penalty (``penalty_in: reward``), else the score."""
        if self.config.penalty_in != "reward":
            return scored.scores
        return scored.scores - self.beta * (scored.penalty.per_token * scored.mask).sum(1)

    # ------------------------------------------------------------------ loss
    def penalty_terms(
        self, scored: ScoredRollout, rows: torch.Tensor, logits: torch.Tensor, logprobs: torch.Tensor
    ) -> torch.Tensor:
        """(b, T) per-position distance term with gradient (``penalty_in: loss``): k3 for the KL, else the
        surrogate :math:`\\sum_i \\pi_\\theta(i)\\phi_i` (0 off-mask).

        Args:
            rows: the rollout rows of this micro-batch. logits: (b, T, V) tempered policy logits (with grad).
            logprobs: (b, T) the sampled tokens' log-probabilities (with grad).
        """
        mask = scored.mask[rows]
        if self.uses_k3:
            return k3(logprobs, scored.ref_logprobs[rows]) * mask
        if scored.potentials is not None:
            potentials = rows_of(scored.potentials, rows)
        else:
            rollout = scored.rollout
            with torch.no_grad():
                ref_logits = response_logits(self.ref_model, rollout, rows) / self.config.temperature
                gradient = self.regularizer.support_gradient(logits.detach(), ref_logits, rollout.responses[rows], mask)
            potentials = on_grid(gradient, mask)
        return potentials.surrogate(torch.log_softmax(logits.float(), -1)).float() * mask

    def penalty_loss(
        self,
        scored: ScoredRollout,
        rows: torch.Tensor,
        logits: torch.Tensor,
        logprobs: torch.Tensor,
        weights: torch.Tensor,
        normalizer: float,
    ) -> torch.Tensor:
        """:math:`\\beta \\sum_t w_t d_t / Z` (:meth:`penalty_terms`); a zero tensor with ``penalty_in: reward``."""
        if self.config.penalty_in != "loss":
            return torch.zeros((), device=logprobs.device)
        return self.beta * (self.penalty_terms(scored, rows, logits, logprobs) * weights).sum() / normalizer

    def update(
        self,
        step: int,
        mask: torch.Tensor,
        epochs: int,
        units: torch.Tensor,
        loss_of: Callable[[torch.Tensor, float], tuple[torch.Tensor, dict, dict]],
    ) -> dict[str, float]:
        """``epochs`` passes over ``num_mini_batches`` shuffled mini-batches, one optimizer step each.

        Args:
            step: the step (seeds the shuffles).
            mask: (B, T) generated positions (denominators of the statistics).
            epochs: passes over the rollouts.
            units: (B,) each rollout's share of a mini-batch's loss normalizer Z (its token count for a token
                mean, 1 for a mean over sequences, ...); Z sums them over the global mini-batch.
            loss_of: ``(rows, normalizer) -> (loss, losses, sums)``: ``loss`` to back-propagate, ``losses``
                named parts already divided by the per-process normalizer, ``sums`` statistics summed over
                the micro-batch's generated tokens.

        Returns:
            Losses averaged over the applied optimizer steps and processes, statistics per token, ``learning_rate``
            and ``grad_norm`` (:meth:`~otalign.trainers.base.BaseTrainer.advance`); with ``on_nonfinite: skip``,
            steps skipped for a non-finite loss or gradient are left out.
        """
        c, acc = self.config, self.accelerator
        losses: dict[str, float] = {}
        sums: dict[str, float] = {}
        tokens, updates = 0.0, 0
        gen = torch.Generator().manual_seed(stream_seed(c.seed, step))
        for _ in range(epochs):
            order = torch.randperm(mask.shape[0], generator=gen).to(mask.device)
            for minibatch in order.chunk(c.num_mini_batches):
                normalizer = float(pm.global_sum(units[minibatch].sum(), acc)) / acc.num_processes
                micro = minibatch.chunk(c.gradient_accumulation_steps)
                update_losses: dict[str, float] = {}
                update_sums: dict[str, float] = {}
                for k, rows in enumerate(micro):
                    with self.no_sync(last=k == len(micro) - 1):
                        loss, parts, stats = loss_of(rows, max(normalizer, 1e-12))
                        self.guard.watch("the loss", loss, self.divergence_cause())
                        acc.backward(loss)
                    for name, value in parts.items():
                        update_losses[name] = update_losses.get(name, 0.0) + float(value)
                    for name, value in stats.items():
                        update_sums[name] = update_sums.get(name, 0.0) + float(value)
                if self.apply_gradients(step):  # a skipped step's (non-finite) losses are not averaged in
                    for name, value in update_losses.items():
                        losses[name] = losses.get(name, 0.0) + value
                    for name, value in update_sums.items():
                        sums[name] = sums.get(name, 0.0) + value
                    tokens += float(mask[minibatch].sum())
                    updates += 1
        optimizer_metrics = self.advance()
        totals = pm.global_sum(torch.tensor([*losses.values(), *sums.values(), tokens]), acc)
        metrics = {name: float(totals[i]) / (updates * acc.num_processes) for i, name in enumerate(losses)}
        offset = len(losses)
        metrics.update({name: float(totals[offset + i] / totals[-1].clamp_min(1)) for i, name in enumerate(sums)})
        metrics.update(optimizer_metrics)
        return metrics

    # ------------------------------------------------------------------ metrics
    def rollout_metrics(self, scored: ScoredRollout) -> dict[str, float]:
        """Rollout statistics over all processes (token means weighted by token counts), ``beta`` used this step
        and the measured distance ``regularizer/distance`` the adaptive beta steers."""
        acc, mask = self.accelerator, scored.mask
        scores, penalty = scored.scores, scored.penalty
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
            **{f"reward/{name}": batch_mean(values) for name, values in scored.components.items()},
            "penalty/mean": token_mean(penalty.per_token),
            "kl/exact": token_mean(scored.kl),
            "kl/exact_seq": batch_mean((scored.kl * mask).sum(1)),
            "policy/entropy": token_mean(scored.entropy),
            "response/length": batch_mean(mask.sum(1).float()),
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
        metrics["beta"] = self.beta
        metrics["regularizer/distance"] = metrics.get(distance_key(self.regularizer), metrics["penalty/mean"])
        return metrics

    def end_rl_step(self, step: int, metrics: dict[str, float]) -> None:
        """Move the adaptive beta by the step's measured distance, then log and checkpoint (:meth:`end_step`)."""
        n = self.config.step_batch_size * self.accelerator.num_processes
        self.beta_controller.update(metrics["regularizer/distance"], n)
        self.end_step(step, metrics)


def _has_support_gradient(regularizer) -> bool:
    if isinstance(regularizer, Regularizer):
        return type(regularizer)._support_gradient is not Regularizer._support_gradient
    return hasattr(regularizer, "support_gradient")


__all__ = [
    "BetaController",
    "Prompt",
    "RLConfig",
    "RLTrainer",
    "ScoredRollout",
    "check_context",
    "distance_key",
    "k3",
    "regularizer_from_config",
]
