"""``otalign data prepare``: ``on_error: skip`` for the ``preference`` format, and split files never overwritten
without ``--overwrite_output_dir``."""

from __future__ import annotations

import json

import pytest

from otalign.cli import main


def run_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def pairs_file(tmp_path, extra: list[str]):
    rows = [json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) for i in range(10)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows[:5] + extra + rows[5:]) + "\n", encoding="utf-8")
    return path


def test_on_error_skip_leaves_out_and_counts_bad_preference_rows(tmp_path, capsys):
    bad = [
        '{"prompt": "x", "chosen": "", "rejected": "b"}',
        "{oops",
        '{"prompt": "y"}',
        '{"prompt": "q0", "chosen": 1}',
    ]
    path = pairs_file(tmp_path, bad)
    out = tmp_path / "prepared"
    argv = ["data", "prepare", "--dataset", str(path), "--output_dir", str(out)]
    line = run_error(argv, capsys)
    assert line.startswith(f"otalign data prepare: error: {path}, row 7: not valid JSON (Expecting property name")
    assert not out.exists()
    assert main([*argv, "--on_error", "skip"]) == 0
    printed = capsys.readouterr().out
    assert '"skipped": {"bad JSON": [7], "invalid": [6, 8, 9]}' in printed and '"pairs": 10' in printed
    kept = [json.loads(row) for row in (out / "preferences.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in kept] == [f"q{i}" for i in range(10)]


def test_existing_split_files_are_replaced_only_with_overwrite_output_dir(tmp_path, capsys):
    path = pairs_file(tmp_path, [])
    out = tmp_path / "prepared"
    argv = ["data", "prepare", "--dataset", str(path), "--output_dir", str(out)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["preferences.jsonl", "reward.jsonl", "rl.jsonl", "sft.jsonl"]
    line = run_error([*argv, "--seed", "7"], capsys)
    assert line == (
        f"otalign data prepare: error: --output_dir {out} already holds preferences.jsonl, sft.jsonl, reward.jsonl, "
        "rl.jsonl; pass --overwrite_output_dir true to replace them or choose another output_dir"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*argv, "--seed", "7", "--overwrite_output_dir", "true"]) == 0
    assert (out / "sft.jsonl").read_bytes() != before["sft.jsonl"]
