"""The README's "Differences from TRL" table (:mod:`otalign.readme.trl_differences`) against what the parity suite
proves (:mod:`cases`): no difference row on something a passing case shows equal, every known mismatch (a strict
xfail) listed as a difference with its reason, every claim of sameness backed by a case or a named test. That the
README shows the generated table is ``tests/test_readme.py``'s check."""

from __future__ import annotations

from pathlib import Path

import pytest
from cases import CASES
from parity import Case

from otalign.readme.trl_differences import ROWS, Row, differences

ROOT = Path(__file__).resolve().parents[2]


def inconsistencies(rows: tuple[Row, ...], cases: list[Case]) -> list[str]:
    """Every way ``rows`` contradict ``cases`` or lack a reason, one line each (empty: consistent)."""
    proven = {key for case in cases if case.differs is None for key in case.proves}
    differing = {key for row in rows if row.why is not None for key in row.keys}
    problems = []
    for row in rows:
        if not row.keys:
            problems.append(f"row {row.what!r} names no keys")
        if row.why is not None:
            if not row.why.strip() or row.why.strip() == "—":
                problems.append(f"difference row {row.what!r} gives no reason")
            problems += [
                f"row {row.what!r} claims a difference on {key!r}, which a parity case proves equal"
                for key in sorted(set(row.keys) & proven)
            ]
        elif row.tested_by is not None:
            if not (ROOT / row.tested_by).is_file():
                problems.append(f"row {row.what!r} names a test that does not exist: {row.tested_by}")
        else:
            problems += [
                f"row {row.what!r} claims sameness on {key!r}: no parity case proves it and it names no test"
                for key in row.keys
                if key not in proven
            ]
    for case in cases:
        if case.differs is not None:
            problems += [
                f"parity case {case.id} differs from TRL on {key!r}, which no difference row lists"
                for key in case.proves
                if key not in differing
            ]
    return problems


def test_the_table_is_consistent_with_the_parity_suite():
    assert inconsistencies(ROWS, CASES) == []


def test_every_difference_row_has_a_reason():
    assert differences() and all(row.why and row.why.strip() not in ("", "—") for row in differences())


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (  # a difference claimed on what the GRPO cases prove equal
            lambda rows: (*rows, Row("`loss_type: dapo`", "x", "y", "z", ("GRPOConfig.loss_type=dapo",))),
            "which a parity case proves equal",
        ),
        (lambda rows: (*rows, Row("a", "x", "y", " ", ("k",))), "gives no reason"),
        (lambda rows: (*rows, Row("a", "x", "the same", None, ("never proven",))), "claims sameness"),
        (lambda rows: (*rows, Row("a", "x", "the same", None, ("k",), "tests/nowhere.py")), "does not exist"),
        (lambda rows: (*rows, Row("a", "x", "y", "z", ())), "names no keys"),
        (  # the SFT tokenization row removed: the strict xfail is no longer listed
            lambda rows: tuple(r for r in rows if "SFT tokenization of prompt + completion text" not in r.keys),
            "which no difference row lists",
        ),
    ],
)
def test_the_check_finds_a_false_table(edit, problem):
    problems = inconsistencies(edit(ROWS), CASES)
    assert problems and all(problem in line for line in problems), problems


def test_neither_dpo_config_has_the_prompt_and_completion_lengths():
    """Backs the row on ``max_prompt_length``/``max_completion_length``: gone from TRL's DPOConfig, not offered by
    otalign's."""
    import dataclasses

    trl = pytest.importorskip("trl")
    from otalign.trainers import PreferenceConfig

    for config in (trl.DPOConfig, PreferenceConfig):
        names = {f.name for f in dataclasses.fields(config)}
        assert not names & {"max_prompt_length", "max_completion_length"}, config
        assert "max_length" in names
