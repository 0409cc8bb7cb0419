"""``otalign pipeline``: data -> sft -> reward -> ppo -> eval from one config, each stage feeding the next.

Layout under ``output_dir``::

    data/    preferences.jsonl (synthesized or converted), sft.jsonl, reward.jsonl, rl.jsonl (the paper's split)
    sft/     SFTTrainer run; sft/model is the policy the later stages start from
    reward/  RewardTrainer run from sft/model (10% of its pairs held out); reward/model scores PPO's responses
    ppo/     PPOTrainer run from sft/model with reward/model as its reward and critic backbone (any regularizer)
    eval/    win rates of ppo/model against sft/model, judged by reward/model (``otalign eval``)

A stage that finished leaves a ``COMPLETE`` file (its summary, JSON) in its folder and is skipped by later runs,
whatever the config says now (delete the file, or the folder, to run it again); an unfinished trainer stage
resumes from its latest checkpoint (with ``save_steps`` > 0). Each stage's settings are a
section of the config holding fields of its own config class (``sft:`` :class:`~otalign.trainers.SFTConfig`,
``reward:`` ``RewardConfig``, ``ppo:`` ``PPOConfig``, ``eval:`` :class:`~otalign.eval.config.EvalConfig`,
``synth:`` :class:`~otalign.demos.synth.SynthConfig`); the links between stages (model paths, datasets,
output folders) are filled in unless a section sets them. On the command line ``--sft.max_steps 10`` sets a
section field. Every stage's config is built and validated before the first stage runs
(:meth:`PipelineConfig.validate`): a bad ``--ppo.*`` setting, or a path a section names that does not exist, is
reported before SFT trains; the links are not checked then, as earlier stages write them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from otalign.config import Config, ConfigError, check_paths, check_section, parse_config, resolve
from otalign.data.reading import ON_ERROR
from otalign.data.splits import DATASET_FORMATS

STAGES = ("data", "sft", "reward", "ppo", "eval")
MARKER = "COMPLETE"


def _section_classes() -> dict[str, type]:
    return {
        f.name: resolve(f.metadata["section"]) for f in dataclasses.fields(PipelineConfig) if "section" in f.metadata
    }


def _section(stage: str, config: str) -> dataclasses.Field:
    return field(default_factory=dict, metadata={"help": f"settings of the {stage}", "section": config})


@dataclass
class PipelineConfig(Config):
    """The whole pipeline (layout in the module docstring)."""

    output_dir: str = field(default="runs/pipeline", metadata={"path": "output", "help": "the run folder"})
    model_name_or_path: str = field(
        default="default", metadata={"path": "model", "help": "the base model SFT starts from"}
    )
    seed: int = field(default=0, metadata={"help": "every stage's seed (unless its section sets one) and the split's"})
    dataset: str = field(
        default="builtin",
        metadata={
            "path": "data",
            "builtins": ("builtin", "synth"),
            "help": "'builtin' (the packaged demo pairs), 'synth' (new pairs from the base model) or a file",
        },
    )
    dataset_format: str = field(
        default="preference", metadata={"help": "schema of a dataset file", "choices": DATASET_FORMATS}
    )
    on_error: str = field(
        default="raise",
        metadata={"help": "raise on or skip (and count) bad rows of a converted dataset", "choices": ON_ERROR},
    )
    split_fractions: list[float] = field(
        default_factory=lambda: [0.2, 0.4, 0.4],
        metadata={"help": "SFT / reward / RL shares of the pairs (the paper's)", "check": "[0, 1]"},
    )
    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata={"help": "the stages to run, in order", "choices": STAGES}
    )
    synth: dict = _section("synth stage (dataset synth)", "otalign.demos.synth:SynthConfig")
    sft: dict = _section("sft stage", "otalign.trainers.sft:SFTConfig")
    reward: dict = _section("reward stage", "otalign.trainers.reward:RewardConfig")
    ppo: dict = _section("ppo stage", "otalign.trainers.ppo:PPOConfig")
    eval: dict = _section("eval stage", "otalign.eval.config:EvalConfig")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.split_fractions) != 3:
            raise ConfigError(f"split_fractions needs three shares (sft, reward, rl), got {self.split_fractions}")
        for name, cls in _section_classes().items():
            setattr(self, name, check_section(cls, getattr(self, name), name))

    def validate(self) -> None:
        """Check the paths of this config, then build and validate every configured stage's config
        (:meth:`Pipeline.check_stages`): all before the first stage runs."""
        super().validate()
        Pipeline(self).check_stages()


def parse_pipeline_config(config_file: str | Path | None = None, argv: list[str] | None = None) -> PipelineConfig:
    """:class:`PipelineConfig` from a YAML file and ``--key value`` / ``--section.key value`` overrides."""
    return parse_config(PipelineConfig, config_file, argv)


class Pipeline:
    """Runs the stages of a :class:`PipelineConfig` (see the module docstring)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.root = Path(config.output_dir)
        self.data = self.root / "data"

    def folder(self, stage: str) -> Path:
        return self.root / stage

    def model(self, stage: str) -> str:
        """The saved model of a trainer stage."""
        return str(self.folder(stage) / "model")

    def done(self, stage: str) -> bool:
        return (self.folder(stage) / MARKER).is_file()

    def run(self) -> dict[str, str]:
        """Check every stage's settings (:meth:`PipelineConfig.validate`), then run every configured stage in order;
        returns ``{stage: "ran" | "skipped"}``."""
        self.config.validate()
        status = {}
        for stage in self.config.stages:
            if self.done(stage):
                print(f"[otalign] pipeline: {stage} already complete ({self.folder(stage) / MARKER}), skipping")
                status[stage] = "skipped"
                continue
            print(f"[otalign] pipeline: running {stage}", flush=True)
            summary = getattr(self, f"run_{stage}")()
            marker = self.folder(stage) / MARKER
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(summary or {}, indent=2), encoding="utf-8")
            status[stage] = "ran"
        return status

    def check_stages(self) -> None:
        """Build and validate the config of every configured stage before any runs, so a bad setting of a late
        stage costs no training. A path the pipeline links (a model or file an earlier stage writes) is not
        checked: it need not exist yet; paths a section sets are.

        Raises:
            ConfigError: ``"<section>.<field> ..."`` (or ``"<section>: ..."``) for the first bad setting.
        """
        for stage in self.config.stages:
            section = self.section_of(stage)
            if section is None:
                continue
            defaults = self.defaults(section)
            try:
                check_paths(self.stage_config(section, defaults), skip=tuple(set(defaults) - set(self.given(section))))
            except ConfigError as err:
                field_first = err.field is not None and str(err).startswith(err.field)
                raise ConfigError(f"{section}.{err}" if field_first else f"{section}: {err}", section) from None

    def section_of(self, stage: str) -> str | None:
        """The config section of ``stage`` (the data stage has one only when it synthesizes)."""
        if stage == "data":
            return "synth" if self.config.dataset == "synth" else None
        return stage

    def given(self, section: str) -> dict:
        """The fields a config section sets."""
        return getattr(self.config, section)

    def stage_config(self, section: str, defaults: dict):
        """The stage's config object: ``defaults`` (links, seed) overridden by the config's section."""
        return _section_classes()[section](**{**defaults, **self.given(section)})

    def defaults(self, section: str) -> dict:
        """What the pipeline fills in for a section (links between stages, seed, output folders)."""
        c = self.config
        trainer = {"output_dir": str(self.folder(section)), "seed": c.seed, "resume": True}
        if section == "synth":
            return {
                "output": str(self.data / "synth.jsonl"),
                "model_name_or_path": c.model_name_or_path,
                "seed": c.seed,
            }
        if section == "sft":
            return {**trainer, "model_name_or_path": c.model_name_or_path, "dataset_name": str(self.data / "sft.jsonl")}
        if section == "reward":
            held_out = {} if "eval_dataset_name" in c.reward else {"eval_split_size": 0.1}  # for pairwise accuracy
            return {
                **trainer,
                "model_name_or_path": self.model("sft"),
                "dataset_name": str(self.data / "reward.jsonl"),
                **held_out,
            }
        if section == "ppo":
            return {
                **trainer,
                "model_name_or_path": self.model("sft"),
                "reward_fn": None,
                "reward_model_name_or_path": self.model("reward"),
                "critic_model_name_or_path": self.model("reward"),  # the paper initialises the critic from the RM
                "prompts": str(self.data / "rl.jsonl"),
            }
        return {
            "output_dir": str(self.folder("eval")),
            "models": [self.model("sft"), self.model("ppo")],
            "prompts": "builtin" if c.dataset in ("builtin", "synth") else str(self.data / "rl.jsonl"),
            "judge": "reward_model",
            "judge_model": self.model("reward"),
            "seed": c.seed,
        }

    def run_data(self) -> dict:
        """Synthesize or read the preference pairs, then split them 20/40/40 into the stages' files."""
        from otalign.data.splits import prepare_stage_files

        c = self.config
        source, dataset_format = c.dataset, c.dataset_format
        if source == "synth":
            from otalign.demos import synth

            source, dataset_format = str(synth.run(self.stage_config("synth", self.defaults("synth")))), "preference"
        fractions = tuple(c.split_fractions)
        return prepare_stage_files(
            source, self.data, dataset_format=dataset_format, seed=c.seed, fractions=fractions, on_error=c.on_error
        )

    def run_sft(self) -> dict:
        from otalign.trainers import SFTTrainer

        return {"metrics": SFTTrainer(self.stage_config("sft", self.defaults("sft"))).train()[-1]}

    def run_reward(self) -> dict:
        from otalign.trainers import RewardTrainer

        return {"metrics": RewardTrainer(self.stage_config("reward", self.defaults("reward"))).train()[-1]}

    def run_ppo(self) -> dict:
        from otalign.trainers import PPOTrainer

        history = PPOTrainer(self.stage_config("ppo", self.defaults("ppo"))).train()
        return {"metrics": history[-1] if history else {}}

    def run_eval(self) -> dict:
        from otalign.eval.run import run_eval

        run_eval(self.stage_config("eval", self.defaults("eval")))
        return {"winrates": str(self.folder("eval") / "winrates.json")}
