"""The sweep file: :class:`SweepConfig`, the trainer table, and the grid of cells it expands to.

A sweep trains one command (``ppo``, ``dpo``, or any trainer in :data:`TRAINERS`) over a grid::

    command: ppo
    output_dir: runs/wpr-vs-kl
    base: {max_steps: 60, use_peft: true}        # fields of the command's config, shared by every cell
    methods:                                     # name -> fixed fields (+ an optional grid of its own)
      wpr: {regularizer: wasserstein, grid: {beta: [0.02, 0.05, 0.1]}}
      rkl: {regularizer: rkl, grid: {beta: [0.002, 0.005, 0.01]}}
    grid: {learning_rate: [1e-4, 3e-4]}          # every method, crossed with its own grid
    seeds: [0, 1, 2]

Each cell is one (method, setting, seed): ``base`` overridden by the method's fields, the setting's values
and ``seed``. Its folder name lists exactly what distinguishes it (``wpr,beta=0.05,seed=0``), in a fixed order
(methods and grid keys as written, values in the order given), so names are the same on every run.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from otalign.config import Config, ConfigError, check_keys, coerce, field_types, parse_config
from otalign.data.prompts import PROMPT_SETS
from otalign.eval.analysis.encoder import encoder_problem
from otalign.registry import resolve

TRAINERS: dict[str, tuple[str, str]] = {
    "ppo": ("otalign.trainers.ppo:PPOConfig", "otalign.trainers.ppo:PPOTrainer"),
    "dpo": ("otalign.trainers.preference:PreferenceConfig", "otalign.trainers.preference:PreferenceTrainer"),
    "grpo": ("otalign.trainers.critic_free:GRPOConfig", "otalign.trainers.critic_free:GRPOTrainer"),
    "rloo": ("otalign.trainers.critic_free:RLOOConfig", "otalign.trainers.critic_free:RLOOTrainer"),
}
"""``command -> (config class, trainer class)`` as ``"module:Name"`` (imported on use). A trainer plugs into the
sweep by one entry here: its config derives from :class:`~otalign.trainers.TrainerConfig` (``output_dir``,
``seed``, ``resume``, ``save_steps``, ``save_model``, ``progress_bar``), ``Trainer(config).train()`` runs it and
writes the policy to ``output_dir/model``."""

ANALYSES = ("penalty_correlation", "coherence", "semantic_similarity")
SEED_KEY = "seed"


def launcher_names() -> tuple[str, ...]:
    """The ``launcher`` field's choices: the names of :data:`otalign.sweep.launchers.LAUNCHERS`."""
    from .launchers import LAUNCHERS

    return tuple(LAUNCHERS)


def trainer_classes(command: str) -> tuple[type, type]:
    """``(config class, trainer class)`` of ``command``; ``ConfigError`` for an unknown one."""
    if command not in TRAINERS:
        raise ConfigError(f"command: unknown trainer {command!r}; choose one of {sorted(TRAINERS)}")
    config_path, trainer_path = TRAINERS[command]
    return resolve(config_path), resolve(trainer_path)


@dataclass
class SweepConfig(Config):
    """Settings of ``otalign sweep`` (the grid, where it runs, and the shared held-out evaluation)."""

    command: str = field(default="ppo", metadata={"help": f"trainer every cell runs: one of {sorted(TRAINERS)}"})
    output_dir: str = field(
        default="runs/sweep",
        metadata={"path": "output_dir", "help": "one folder per cell, reference/, results.json and the PNGs"},
    )
    results_dir: str | None = field(
        default=None, metadata={"help": "where results.json and the PNGs go (None: output_dir)"}
    )
    base_config: str | None = field(
        default=None,
        metadata={"path": "file", "help": "YAML file with the command's config shared by every cell (None: defaults)"},
    )
    base: dict = field(default_factory=dict, metadata={"help": "command config fields on top of base_config"})
    methods: dict = field(
        default_factory=dict,
        metadata={"help": "name -> {field: value, ..., grid: {field: [values]}}; empty: one method named command"},
    )
    grid: dict = field(
        default_factory=dict, metadata={"help": "field -> list of values, crossed with every method's own grid"}
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "training seeds; every setting runs each"})
    launcher: str = field(
        default="sequential",
        metadata={
            "help": "how cells run: sequential (one by one in this process) or ray (one Ray task per cell, in parallel "
            "on the cluster at RAY_ADDRESS, else a local one; pip install 'otalign[cluster]')",
            "choices": launcher_names,
        },
    )
    cpus_per_cell: float = field(
        default=1.0,
        metadata={
            "help": "launcher ray: CPUs each cell's task reserves (Ray's num_cpus; also its torch threads, at least 1)",
            "check": "> 0",
        },
    )
    gpus_per_cell: float = field(
        default=0.0,
        metadata={
            "help": "launcher ray: GPUs each cell's task reserves (Ray's num_gpus; 0.5: two cells share one; 0: CPU)",
            "check": ">= 0",
        },
    )
    save_steps: int | None = field(
        default=None,
        metadata={"help": "checkpoint every N steps in each cell (None: the base's save_steps, else max_steps // 4)"},
    )
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "keep a cell's checkpoints once its model is saved (false: delete them)"}
    )
    aggregate_only: bool = field(
        default=False,
        metadata={
            "help": "train and evaluate nothing: rebuild the results from the cell folders",
            "aliases": ["--aggregate-only"],
        },
    )
    reference: str | None = field(
        default=None,
        metadata={"path": "model", "help": "reference model (None: the base's ref_model_name_or_path or model)"},
    )
    eval_prompts: str = field(
        default="builtin",
        metadata={"path": "data", "builtins": PROMPT_SETS, "help": "held-out prompts: builtin or a prompt dataset"},
    )
    eval_split: str = field(default="test", metadata={"help": "split of the built-in prompts"})
    num_eval_prompts: int = field(default=0, metadata={"help": "seeded subsample of the held-out prompts (0: all)"})
    eval_batch_size: int = field(default=16, metadata={"help": "prompts per evaluation batch"})
    eval_seed: int = field(
        default=0,
        metadata={"help": "prompt subsample and per-prompt sampling seeds (all cells)", "check": "[0, 4294967295]"},
    )
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "tokens per held-out response (None: the base's response_length, else 64)"}
    )
    eval_temperature: float | None = field(
        default=None, metadata={"help": "sampling temperature (None: the base's temperature, else 0.8)"}
    )
    eval_top_k: int | None = field(default=None, metadata={"help": "top-k sampling (None: the base's, else 50)"})
    eval_top_p: float | None = field(default=None, metadata={"help": "top-p sampling (None: the base's, else 1.0)"})
    eval_reward_fn: str | None = field(
        default=None, metadata={"help": "built-in reward scoring held-out answers (None: the base's, else sentiment)"}
    )
    eval_reward_model: str | None = field(
        default=None,
        metadata={"path": "model", "help": "reward model scoring held-out answers instead of eval_reward_fn"},
    )
    eval_w_lambda: float | None = field(
        default=None, metadata={"help": "W measurement: 1/eps of the Sinkhorn solve (None: the regularizer default)"}
    )
    eval_w_top_k: int | None = field(
        default=None, metadata={"help": "W measurement: top-k support per distribution (None: default, capped at V)"}
    )
    eval_w_metric: str | None = field(default=None, metadata={"help": "W measurement: euclidean or cosine cost"})
    eval_w_knn: int | None = field(default=None, metadata={"help": "W measurement: nearest-k cost truncation"})
    eval_w_transport: str | None = field(default=None, metadata={"help": "W measurement: difference or full"})
    eval_w_max_iter: int | None = field(default=None, metadata={"help": "W measurement: Sinkhorn iteration cap"})
    eval_w_tol: float | None = field(default=None, metadata={"help": "W measurement: marginal-error tolerance"})
    analyses: list[str] = field(
        default_factory=lambda: list(ANALYSES), metadata={"help": f"the paper's analyses to run: any of {ANALYSES}"}
    )
    coherence_top_k: int = field(default=10, metadata={"help": "next-token candidates per position (coherence)"})
    encoder: str = field(default="minilm", metadata={"help": "sentence encoder for semantic similarity"})
    match_kl: float | None = field(
        default=None,
        metadata={"help": "KL per token the head-to-head matches at (None: middle of the methods' common range)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self._check()
        except ConfigError as err:
            if err.field is not None:
                raise
            # the messages start with the field they blame ("grid.beta[1]: ..."): let the parser name its source
            name = re.match(r"[A-Za-z_]+", str(err))
            fields = {f.name for f in dataclasses.fields(self)}
            raise ConfigError(str(err), name.group(0) if name and name.group(0) in fields else None) from None
        try:
            check_cells(self)  # every cell's command config is built once, so a bad value fails before anything runs
        except ConfigError as err:
            if err.field is not None:
                raise
            blamed = "methods" if self.methods else "grid" if self.grid else "base"
            raise ConfigError(str(err), blamed) from None

    def validate(self) -> None:
        """The path fields, then the encoder when semantic similarity runs: before the first cell trains."""
        super().validate()
        if "semantic_similarity" in self.analyses and (problem := encoder_problem(self.encoder)):
            raise ConfigError(f"encoder: {problem}", "encoder")

    def _check(self) -> None:
        trainer_classes(self.command)
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: repeated seed in {self.seeds}")
        for name in ("num_eval_prompts", "save_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        for name in ("eval_batch_size", "coherence_top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown:
            raise ConfigError(f"analyses: unknown analysis {unknown[0]!r}; choose from {ANALYSES}")
        if self.eval_reward_fn is not None and self.eval_reward_model is not None:
            raise ConfigError("eval_reward_fn and eval_reward_model: set one of them, not both")
        types_ = self.command_types()
        self.base = _fields(self.base, types_, "base")
        self.grid = _grid(self.grid, types_, "grid")
        if not isinstance(self.methods, dict):
            raise ConfigError("methods: expected a mapping of method name to its fields")
        methods = {}
        for name, spec in self.methods.items():
            where = f"methods.{name}"
            if not isinstance(name, str) or not _SAFE.fullmatch(name):
                raise ConfigError(f"{where}: a method name is letters, digits, '.', '_' or '-', got {name!r}")
            spec = {} if spec is None else spec
            if not isinstance(spec, dict):
                raise ConfigError(f"{where}: expected a mapping of field: value, got {spec!r}")
            spec = dict(spec)
            own_grid = _grid(spec.pop("grid", {}) or {}, types_, f"{where}.grid")
            clash = sorted(set(own_grid) & set(self.grid))
            if clash:
                raise ConfigError(f"{where}.grid: {clash[0]!r} is also in the top-level grid; keep it in one place")
            methods[name] = {"fields": _fields(spec, types_, where), "grid": own_grid}
        # name -> {"fields": {...}, "grid": {...}}, checked and converted; an attribute, not a config field
        self.method_specs = methods or {self.command: {"fields": {}, "grid": {}}}
        for name, values in [("base", self.base)] + [(f"methods.{m}", s["fields"]) for m, s in methods.items()]:
            for key in (SEED_KEY, "output_dir"):
                if key in values:
                    raise ConfigError(f"{name}.{key}: set by the sweep for every cell (use seeds: / output_dir:)")
        for where, grid in [("grid", self.grid)] + [(f"methods.{m}.grid", s["grid"]) for m, s in methods.items()]:
            for key in (SEED_KEY, "output_dir"):
                if key in grid:
                    raise ConfigError(f"{where}.{key}: set by the sweep for every cell (use seeds: / output_dir:)")

    def command_types(self) -> dict[str, object]:
        return field_types(trainer_classes(self.command)[0])

    def base_values(self) -> dict:
        """The command's config fields every cell starts from: those ``base_config`` sets (if any), then ``base``."""
        values = {}
        if self.base_config is not None:
            parsed = parse_config(trainer_classes(self.command)[0], self.base_config)
            written = yaml.safe_load(Path(self.base_config).read_text(encoding="utf-8")) or {}
            values = {k: getattr(parsed, k) for k in written}
        return {**values, **self.base}

    def cell_config(self, cell: Cell):
        """The command's config of ``cell``: the base, the cell's overrides, and what the sweep fixes (its folder,
        ``resume``, a saved model, checkpoints every :meth:`checkpoint_steps`, no per-cell progress bar unless set).

        Raises:
            ConfigError: the command's config rejects the values, naming the cell.
        """
        config_cls, _ = trainer_classes(self.command)
        values = {**self.base_values(), **cell.overrides}
        values.setdefault("progress_bar", False)
        values.update(output_dir=str(Path(self.output_dir) / cell.name), resume=True, save_model=True)
        try:
            probe = config_cls(**values)
            return dataclasses.replace(probe, save_steps=self.checkpoint_steps(probe))
        except ConfigError as err:
            raise ConfigError(f"cell {cell.name}: {err}") from None

    def checkpoint_steps(self, cell_config) -> int:
        """Checkpoint interval of a cell: ``save_steps``, else the base's, else a quarter of its steps."""
        if self.save_steps:
            return self.save_steps
        return cell_config.save_steps or max(1, cell_config.max_steps // 4)


_SAFE = re.compile(r"[A-Za-z0-9._+-]+")


def _fields(values: object, types_: dict, where: str) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of field: value, got {values!r}")
    check_keys(list(values), types_, where)
    return {k: coerce(v, types_[k], f"{where}.{k}") for k, v in values.items()}


def _grid(values: object, types_: dict, where: str) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of field: [values], got {values!r}")
    check_keys(list(values), types_, where)
    out = {}
    for key, options in values.items():
        if not isinstance(options, list) or not options:
            raise ConfigError(f"{where}.{key}: expected a non-empty list of values, got {options!r}")
        out[key] = [coerce(v, types_[key], f"{where}.{key}[{i}]") for i, v in enumerate(options)]
        if len({repr(v) for v in out[key]}) != len(out[key]):
            raise ConfigError(f"{where}.{key}: repeated value in {options}")
    return out


def parse_sweep_config(config_file: str | Path | None = None, argv: list[str] | None = None) -> SweepConfig:
    """:class:`SweepConfig` from a YAML file and ``--key value`` overrides; every error names the file and field."""
    try:
        config = parse_config(SweepConfig, config_file, argv)
        check_cells(config)
        return config
    except ConfigError as err:
        where = str(config_file) if config_file is not None else "sweep config"
        message = str(err)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


def check_cells(config: SweepConfig) -> list[Cell]:
    """The grid's cells, each one's command config built once so a bad value fails before anything runs."""
    cells = expand_grid(config)
    for cell in cells:
        config.cell_config(cell)
    return cells


@dataclass(frozen=True)
class Cell:
    """One training run of the grid.

    Attributes:
        name: folder name under ``output_dir`` (``method,key=value,...,seed=N``).
        method: the method's name; setting: the grid values of this cell, in grid order; seed: training seed.
        overrides: every config field the cell sets on top of the base (the method's fields, setting, seed).
    """

    name: str
    method: str
    setting: dict
    seed: int
    overrides: dict

    @property
    def setting_name(self) -> str:
        """``method,key=value,...`` (the cell name without its seed): one point of a method's frontier."""
        return ",".join([self.method] + [f"{k}={format_value(v)}" for k, v in self.setting.items()])


def format_value(value: object) -> str:
    """A grid value as it appears in a cell name (numbers with ``:g``, anything unsafe as ``_``)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list):
        text = "+".join(format_value(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "_"


def expand_grid(config: SweepConfig) -> list[Cell]:
    """Every (method, setting, seed) of the sweep, methods in file order, then settings, then seeds.

    Raises:
        ConfigError: two cells would share a folder name (values that print alike, e.g. ``a/b`` and ``a_b``).
    """
    cells = []
    for method, spec in config.method_specs.items():
        grid = {**config.grid, **spec["grid"]}
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            setting = dict(zip(keys, values, strict=True))
            for seed in config.seeds:
                probe = Cell("", method, setting, seed, {})
                name = f"{probe.setting_name},seed={seed}"
                cells.append(Cell(name, method, setting, seed, {**spec["fields"], **setting, SEED_KEY: seed}))
    names = [c.name for c in cells]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"grid: two cells would both be named {repeated[0]!r}; make their values distinct")
    return cells
