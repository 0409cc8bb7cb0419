"""Every data file kind is read by one path (otalign.data.reading) with the same rules: blank lines skipped,
malformed lines skipped and counted under on_error skip, encoding errors and row problems named by file and
1-based row (the line), empty eval responses rejected. Loaders and real commands on tiny files and models."""

from __future__ import annotations

import json
import re

import pytest

from otalign.cli import main
from otalign.data import load_code_problems, load_hh_rlhf, load_prompt_rows, load_sft_data, load_tldr
from otalign.data.preference import load_preference_data
from otalign.eval.generations import read_generations
from otalign.models.tiny import save_tiny_model


def hh_row(i: int) -> dict:
    return {"chosen": f"\n\nHuman: hi {i}\n\nAssistant: good", "rejected": f"\n\nHuman: hi {i}\n\nAssistant: bad"}


def tldr_row(i: int) -> dict:
    info = {"post": f"post {i}", "title": "t", "subreddit": "s"}
    return {"info": info, "summaries": [{"text": " good"}, {"text": " bad"}], "choice": 0}


KINDS = {
    "prompts": (load_prompt_rows, lambda i: {"prompt": f"good day {i}"}),
    "preference": (load_preference_data, lambda i: {"prompt": f"p{i}", "chosen": "good", "rejected": "bad"}),
    "sft": (load_sft_data, lambda i: {"prompt": f"p{i}", "completion": "good"}),
    "generations": (read_generations, lambda i: {"prompt": f"p{i}", "response": "good"}),
    "hh-rlhf": (lambda path: load_hh_rlhf(path).rows, hh_row),
    "tldr": (lambda path: load_tldr(path).rows, tldr_row),
    "code": (
        lambda path: load_code_problems(path).rows,
        lambda i: {"prompt": f"p{i}", "tests": {"inputs": ["1"], "outputs": ["1"]}},
    ),
}


SOURCES = {  # every loader of a dataset the trainers read: (loader, a good row, the field a bad row leaves empty)
    "prompts": (load_prompt_rows, {"prompt": "good day", "answer": "1"}, "prompt"),
    "preference": (load_preference_data, {"prompt": "p", "chosen": "good", "rejected": "bad"}, "chosen"),
    "sft": (load_sft_data, {"prompt": "p", "completion": "good"}, "completion"),
    "sft text": (load_sft_data, {"text": "good day"}, "text"),
}


def write_as(rows: list[dict], fmt: str, path) -> str:
    """``rows`` written as ``fmt``: a ``.jsonl``/``.json``/``.parquet`` file, or a folder written by
    ``Dataset.save_to_disk`` (``saved``) or ``DatasetDict.save_to_disk`` with a ``train`` split (``saved_dict``)."""
    if fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text(lines(*rows), encoding="utf-8")
    elif fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        path = path.with_suffix(".parquet")
        pq.write_table(pytest.importorskip("pyarrow").Table.from_pylist(rows), path)
    else:
        datasets = pytest.importorskip("datasets")
        table = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"train": table}) if fmt == "saved_dict" else table).save_to_disk(str(path))
    return str(path)


def lines(*rows) -> str:
    """JSONL text: dicts as JSON, strings verbatim."""
    return "".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows)


def run_error(argv: list[str], capsys) -> str:
    """The one error line a command that fails with exit status 2 writes to stderr."""
    capsys.readouterr()  # what ran before (saving a tiny model) is not the command's
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"otalign {argv[0]}") and ": error: " in line]
    assert errors == err[-1:], err  # one error line, the last (progress bars of model loading may precede it)
    return err[-1]


@pytest.mark.parametrize("kind", KINDS)
def test_blank_lines_anywhere_are_skipped(kind, tmp_path):
    load, row = KINDS[kind]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n" + lines(row(1), "   ", row(2)) + "\n\n", encoding="utf-8")
    assert len(load(str(path))) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_json_names_the_file_and_its_line(kind, tmp_path):
    load, row = KINDS[kind]
    path = tmp_path / "rows.jsonl"
    path.write_text(lines(row(1), "", '{"prompt": "p2",'), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}, row 3: not valid JSON \("):
        load(str(path))


@pytest.mark.parametrize("kind", KINDS)
def test_non_utf8_bytes_name_the_file_row_and_byte_offset(kind, tmp_path):
    load, row = KINDS[kind]
    path = tmp_path / "rows.jsonl"
    first = lines(row(1)).encode()
    path.write_bytes(first + b'{"prompt": "caf\xe9"}\n')
    offset = len(first) + len('{"prompt": "caf')
    with pytest.raises(ValueError, match=rf"^{path}, row 2 \(byte offset {offset}\): not UTF-8 .*byte e9"):
        load(str(path))


def test_a_json_list_file_reports_malformed_json_by_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n{"prompt": "a", "completion": "b"},\n{"prompt": }\n]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}, row 3: not valid JSON"):
        load_sft_data(str(path))


def test_row_problems_are_numbered_by_line_after_blank_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(lines({"prompt": "a", "chosen": "b", "rejected": "c"}, "", {"prompt": "a", "chosen": "b"}))
    with pytest.raises(ValueError, match=rf"^{path}, row 3: missing field 'rejected'"):
        load_preference_data(str(path))
    path.write_text(lines({"prompt": "a"}, "", {"prompt": "  "}))
    with pytest.raises(ValueError, match=rf"^{path}, row 3, field 'prompt': empty text"):
        load_prompt_rows(str(path))


def test_skip_leaves_out_and_counts_malformed_lines(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(lines(hh_row(1), "not json", "", hh_row(2), '{"chosen": 1}'), encoding="utf-8")
    converted = load_hh_rlhf(str(path), on_error="skip")
    assert len(converted.rows) == 2 and converted.total == 4
    assert converted.skipped == {"bad JSON": [2], "not a string": [5]}
    assert (
        converted.summary(str(path))
        == f"{path}: kept 2 of 4 rows; skipped 1 bad JSON (rows 2); 1 not a string (rows 5)"
    )
    with pytest.raises(ValueError, match=rf"^{path}, row 2: not valid JSON"):
        load_hh_rlhf(str(path))


def test_data_prepare_skips_a_malformed_line_under_on_error_skip(tmp_path, capsys):
    path = tmp_path / "tldr.jsonl"
    path.write_text(lines(*(tldr_row(i) for i in range(3)), "{oops", *(tldr_row(i) for i in range(3, 6))))
    out = tmp_path / "prepared"
    argv = ["data", "prepare", "--dataset", str(path), "--dataset_format", "tldr", "--output_dir", str(out)]
    line = run_error(argv, capsys)
    assert line.startswith(f"otalign data prepare: error: {path}, row 4: not valid JSON (Expecting property name")
    assert not out.exists()
    assert main([*argv, "--on_error", "skip"]) == 0
    assert '"skipped": {"bad JSON": [4]}' in capsys.readouterr().out
    assert len((out / "preferences.jsonl").read_text().splitlines()) == 6


def test_eval_rejects_an_empty_response_before_judging(tmp_path, capsys):
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    good.write_text(lines({"prompt": "a", "response": "nice"}, {"prompt": "b", "response": "fine"}))
    empty.write_text(lines({"prompt": "a", "response": "bad"}, "", {"prompt": "b", "response": " "}))
    out = tmp_path / "eval"
    line = run_error(["eval", "--generation_files", str(good), str(empty), "--output_dir", str(out)], capsys)
    assert (
        line
        == f"otalign eval: error: {empty}, row 3, field 'response': empty text (a judge would compare it as an answer)"
    )
    assert not out.exists()


def test_a_too_long_prompt_names_its_file_and_line(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(lines({"prompt": "good"}, "", {"prompt": "good " * 20}))
    out = tmp_path / "ppo"
    argv = ["ppo", "--model_name_or_path", model, "--prompts", str(prompts), "--output_dir", str(out)]
    line = run_error([*argv, "--max_prompt_length", "3", "--no_use_chat_template", "--no_progress_bar"], capsys)
    assert line.startswith(
        f"otalign ppo: error: {prompts}, row 3: the prompt has 20 tokens, more than max_prompt_length=3"
    )
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()


def test_sft_on_a_non_utf8_file_stops_before_training(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "sft.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "\xff", "completion": "b"}\n')
    out = tmp_path / "sft"
    line = run_error(
        ["sft", "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(out)], capsys
    )
    assert line.startswith(f"otalign sft: error: {data}, row 3 (byte offset 48): not UTF-8")
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()


@pytest.mark.parametrize(
    ("command", "row", "message"),
    [
        ("dpo", {"prompt": "a", "chosen": "good " * 20, "rejected": "bad"}, "field 'chosen': 22 tokens"),
        ("reward", {"prompt": "a", "chosen": "good " * 20, "rejected": "bad"}, "field 'chosen': 22 tokens"),
        ("sft", {"prompt": "a", "completion": "good " * 20}, "22 tokens, more than max_length=8"),
    ],
)
def test_a_too_long_row_is_numbered_by_its_line(command, row, message, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    short = {k: ("a" if k == "prompt" else v if k == "rejected" else "good") for k, v in row.items()}
    data = tmp_path / "rows.jsonl"
    data.write_text(lines(short, "", row))
    out = tmp_path / "run"
    argv = [command, "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(out)]
    line = run_error([*argv, "--max_length", "8", "--truncation_mode", "error", "--no_progress_bar"], capsys)
    assert line.startswith(f"otalign {command}: error: {data}, row 3") and message in line, line
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()


@pytest.mark.parametrize("fmt", ["json", "parquet", "saved", "saved_dict"])
@pytest.mark.parametrize("kind", SOURCES)
def test_every_dataset_reads_json_parquet_and_save_to_disk_as_jsonl(kind, fmt, tmp_path):
    load, good, field = SOURCES[kind]
    rows = [good, {**good, field: f"{good[field]} too"}, {**good, field: "good"}]
    assert load(write_as(rows, fmt, tmp_path / "rows")) == load(write_as(rows, "jsonl", tmp_path / "rows"))
    source = write_as([good, {**good, field: " "}, good], fmt, tmp_path / "bad")
    with pytest.raises(ValueError, match=rf"^{re.escape(source)}, row 2, field '{field}': empty text"):
        load(source)  # rows numbered 1-based by position, as a .jsonl file's by line


def test_a_saved_prompt_set_gives_its_split_and_a_folder_must_be_a_saved_one(tmp_path):
    datasets = pytest.importorskip("datasets")
    train, test = [{"prompt": "good day"}, {"prompt": "bad day"}], [{"prompt": "a cat"}]
    folder = tmp_path / "prompts"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(folder))
    assert load_prompt_rows(str(folder)) == train and load_prompt_rows(str(folder), "test") == test
    with pytest.raises(ValueError, match=rf"^{folder}: no split 'validation'; it has \['test', 'train'\]$"):
        load_prompt_rows(str(folder), "validation")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="^prompt set '.*plain': a folder without dataset_info.json or "):
        load_prompt_rows(str(tmp_path / "plain"))
    with pytest.raises(FileNotFoundError, match=r"^prompt set '.*gone.parquet': no such file \(nor a folder saved"):
        load_prompt_rows(str(tmp_path / "gone.parquet"))
    (tmp_path / "p.csv").write_text("prompt\na\n")
    with pytest.raises(ValueError, match=r"unsupported extension '.csv'; use .jsonl, .json, .txt, .parquet$"):
        load_prompt_rows(str(tmp_path / "p.csv"))
