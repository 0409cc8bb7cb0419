"""The WPR paper's data split: a seeded 20% / 40% / 40% partition into SFT, reward-model and RL subsets.

:func:`paper_split` partitions any rows; :func:`stage_rows` turns the preference rows of each subset into
what its stage reads: SFT ``prompt``/``completion`` (the preferred response, as in the paper: "prompts are
paired with their preferred responses"), reward ``prompt``/``chosen``/``rejected`` unchanged, RL ``prompt``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from otalign.config import Config, ConfigError

from .conversion import Converted
from .reading import ON_ERROR

STAGES = ("sft", "reward", "rl")
OUTPUT_FILES = ("preferences.jsonl", *(f"{stage}.jsonl" for stage in STAGES))
"""The files :func:`prepare_stage_files` writes into its folder."""
PAPER_FRACTIONS = (0.2, 0.4, 0.4)
DATASET_FORMATS = ("preference", "hh-rlhf", "tldr")
"""Input schemas of ``otalign data prepare`` and the pipeline (see :mod:`otalign.data`)."""


def paper_split(rows: list, seed: int = 0, fractions: tuple[float, float, float] = PAPER_FRACTIONS) -> dict[str, list]:
    """``{"sft", "reward", "rl"}`` -> disjoint subsets of ``rows`` covering all of them.

    A seeded permutation gives ``round(fractions[0] * n)`` rows to SFT, ``round(fractions[1] * n)`` to the reward
    model and the rest to RL; each subset keeps the input order. The same ``rows`` and ``seed`` give the same split.

    Raises:
        ValueError: fractions that are negative or do not sum to 1.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
    n = len(rows)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_sft = round(fractions[0] * n)
    cuts = (0, n_sft, min(n_sft + round(fractions[1] * n), n), n)
    return {stage: [rows[i] for i in sorted(order[cuts[k] : cuts[k + 1]])] for k, stage in enumerate(STAGES)}


def stage_rows(split: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The rows each stage trains on, from a :func:`paper_split` of preference rows (``prompt``/``chosen``/...)."""
    return {
        "sft": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in split["sft"]],
        "reward": [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in split["reward"]],
        "rl": [{"prompt": r["prompt"]} for r in split["rl"]],
    }


def preference_rows(source: str, *, on_error: str = "raise") -> Converted:
    """The rows of a ``preference`` dataset, every one validated (file, row, field) before anything is written.

    With ``on_error="raise"`` the first bad row stops everything (:func:`otalign.data.load_preference_data`); with
    ``"skip"`` a bad row (the form, paired or unpaired, set by the first object row) is left out and counted as
    ``invalid``, as are repeats of an earlier row (``duplicate``, :func:`otalign.data.conversion.convert_rows`),
    and the rows kept must still pass the whole-set checks (reference columns in all or none, both labels).
    """
    from .conversion import RowError, convert_rows
    from .preference import load_preference_data, parse_labeled, parse_pair, parse_rows, read_rows

    if on_error == "raise":
        load_preference_data(source)
        rows = read_rows(source)
        return Converted(rows=list(rows), total=len(rows))
    raw = read_rows(source, on_error=on_error)
    first = next((row for row in raw if isinstance(row, dict)), {})
    parse = parse_labeled if "completion" in first else parse_pair
    marker = "\0row"

    def convert(row: dict) -> dict:
        try:
            parse(row, marker)
        except ValueError as err:
            raise RowError("invalid", None, str(err).replace(f"{marker}, ", "").replace(f"{marker}: ", "")) from None
        return row

    converted = convert_rows(raw, source, convert, on_error=on_error)
    parse_rows(converted.rows, source)
    return converted


def prepare_stage_files(
    source: str,
    folder: str | Path,
    *,
    dataset_format: str = "preference",
    seed: int = 0,
    fractions: tuple[float, float, float] = PAPER_FRACTIONS,
    on_error: str = "raise",
) -> dict:
    """Read ``source`` (``preference`` rows, or ``hh-rlhf`` / ``tldr`` in their published schemas), split it with
    :func:`paper_split` and write ``preferences.jsonl`` (all pairs) and ``sft.jsonl``, ``reward.jsonl``,
    ``rl.jsonl`` (:func:`stage_rows`) to ``folder``.

    Returns:
        ``{"pairs", "skipped" (problem -> row numbers), "sft", "reward", "rl" (row counts)}``.

    Raises:
        ValueError: an unknown format, a bad row (with ``on_error="raise"``), or an empty split.
    """
    from .conversion import write_jsonl
    from .hh_rlhf import load_hh_rlhf
    from .tldr import load_tldr

    loaders = {"hh-rlhf": load_hh_rlhf, "tldr": load_tldr}
    if dataset_format == "preference":
        converted = preference_rows(source, on_error=on_error)
    elif dataset_format in loaders:
        converted = loaders[dataset_format](source, on_error=on_error)
    else:
        raise ValueError(f"unknown dataset format {dataset_format!r}; choose preference, {', '.join(loaders)}")
    folder = Path(folder)
    rows = converted.rows
    write_jsonl(rows, folder / "preferences.jsonl")
    split = stage_rows(paper_split(rows, seed, fractions))
    for stage, part in split.items():
        if not part:
            raise ValueError(f"{source}: {len(rows)} pairs leave the {stage} split empty; use more data")
        write_jsonl(part, folder / f"{stage}.jsonl")
    return {"pairs": len(rows), "skipped": converted.skipped, **{k: len(v) for k, v in split.items()}}


@dataclass
class PrepareConfig(Config):
    """Settings of ``otalign data prepare`` (see :func:`prepare_stage_files`)."""

    dataset: str | None = field(
        default=None,
        metadata={"path": "data", "builtins": ("builtin",), "help": "the input file (or Hugging Face dataset name)"},
    )
    dataset_format: str = field(
        default="preference", metadata={"help": "schema of the input rows", "choices": DATASET_FORMATS}
    )
    output_dir: str = field(default="data/prepared", metadata={"path": "output_dir", "help": "where the files go"})
    seed: int = field(default=0, metadata={"help": "seed of the split", "check": "[0, 4294967295]"})
    split_fractions: list[float] = field(
        default_factory=lambda: list(PAPER_FRACTIONS),
        metadata={"help": "SFT / reward / RL shares of the pairs", "check": "[0, 1]"},
    )
    on_error: str = field(default="raise", metadata={"help": "raise on or skip bad rows", "choices": ON_ERROR})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace the files of an earlier prepare in output_dir"}
    )

    def validate(self) -> None:
        """The path fields, then the files of an earlier prepare in ``output_dir``: replaced only with
        ``overwrite_output_dir``."""
        super().validate()
        found = [name for name in OUTPUT_FILES if (Path(self.output_dir) / name).exists()]
        if found and not self.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {self.output_dir} already holds {', '.join(found)}; pass --overwrite_output_dir true to "
                "replace them or choose another output_dir",
                "output_dir",
            )

    def run(self) -> dict:
        """Prepare the files and print a summary; returns :func:`prepare_stage_files`' counts."""
        if self.dataset is None:
            raise ValueError("set dataset (a file in dataset_format)")
        counts = prepare_stage_files(
            self.dataset,
            self.output_dir,
            dataset_format=self.dataset_format,
            seed=self.seed,
            fractions=tuple(self.split_fractions),
            on_error=self.on_error,
        )
        print(f"[otalign] {self.output_dir}: {json.dumps(counts)}", flush=True)
        return counts
