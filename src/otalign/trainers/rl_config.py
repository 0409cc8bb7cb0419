"""``RLConfig``: the fields every RL trainer (PPO, GRPO, RLOO) shares, with their help next to them.

The regularizer's own fields (``f_alpha``, ``kl_estimator``, ``wpr_*``) are read by the regularizer's registry entry
(:func:`otalign.regularizers.regularizer_from_config`), never by a trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from otalign.config import check_value
from otalign.data.prompts import PROMPT_SETS
from otalign.generation import SamplingParams
from otalign.regularizers import KL_ESTIMATORS, REGULARIZERS
from otalign.regularizers.embeddings import EMBEDDING_SOURCES
from otalign.regularizers.wasserstein import METRICS, TRANSPORTS
from otalign.rewards import REWARD_FUNCTIONS, reward_choices

from .config import ConfigError, TrainerConfig

PENALTY_IN = ("reward", "loss")
"""Where the penalty goes: into the reward (``-beta * penalty`` per token) or into the loss (``beta * D``)."""
LOSS_POTENTIALS = ("rollout", "current")
"""``penalty_in: loss``: the surrogate's potentials from the rollout policy (one solve per position per step, in the
scoring pass) or from the current policy at every micro-batch (one more reference forward and solve each time)."""


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
            "path": "data",
            "builtins": PROMPT_SETS,
            "help": "prompt set: builtin, arithmetic, or a dataset (.jsonl/.json/.txt/.parquet, saved folder)",
        },
    )
    prompts_split: str = field(
        default="train", metadata={"help": "split of a built-in prompt set or a saved dataset (train or test)"}
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "path": "data",
            "builtins": PROMPT_SETS,
            "help": "held-out prompt set (as prompts; split dataset_test_split), one response per prompt evaluated "
            "as eval_strategy says: eval_reward, eval_reward_std, eval_kl/exact, eval_regularizer/distance, ...",
        },
    )
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
    use_bias_correction_kl: bool = field(
        default=True,
        metadata={
            "help": "penalty_in loss with the reverse KL's k3 term: multiply it by exp(logp - logp_old), TRL's "
            "importance-sampling correction (false: the plain k3, TRL before 1.16)"
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
    scoring_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "rollouts per forward when scoring (bounds its memory; none: per_device_train_batch_size)",
            "check": ">= 1",
        },
    )
    save_model: bool = field(default=True, metadata={"help": "write the trained policy to output_dir/model"})

    def __post_init__(self) -> None:
        if isinstance(self.reward_fn, str):
            self.reward_fn = [name for name in self.reward_fn.split(",") if name]
        super().__post_init__()
        if self.reward_model_name_or_path is None and not self.reward_fn:
            raise ConfigError(f"no reward given; choose one: {reward_choices()}", "reward_fn")
        if self.reward_model_name_or_path is not None and self.reward_fn:
            raise ConfigError("set reward_fn: null when using reward_model_name_or_path (one reward only)", "reward_fn")

    def resolve_alias(self, name: str, alias: str, default: object) -> None:
        """Make the field ``name`` and its other name ``alias`` (both None by default) one setting: ``name`` gets the
        value given under either, or ``default`` when neither is, and ``alias`` goes back to None (so a saved
        ``config.json`` holds the value once and can be reused with either name overridden); two different values
        are a :class:`ConfigError` naming both, as is a given value outside its field's check (naming the field
        given)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        value, other = getattr(self, name), getattr(self, alias)
        check_value(fields[name], value)
        check_value(fields[alias], other)
        if value is not None and other is not None and value != other:
            raise ConfigError(f"{name}={value} and {alias}={other} are two names of one setting: give one", name)
        chosen = next((v for v in (value, other) if v is not None), default)
        setattr(self, name, chosen)
        setattr(self, alias, None)

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
    def scoring_chunk(self) -> int:
        """Rollouts per forward of the scoring pass: ``scoring_batch_size`` or ``per_device_train_batch_size``."""
        return self.scoring_batch_size or self.per_device_train_batch_size

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.response_length, self.temperature, self.top_k, self.top_p)
