"""Loaders of the paper datasets (HH-RLHF, TL;DR comparisons, APPS) on fixture files in the published schemas:
golden standard columns, bad rows rejected (file, row, field) or skipped and summarised, the 20/40/40 split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otalign.data.apps import load_apps
from otalign.data.conversion import convert_rows, write_jsonl
from otalign.data.hh_rlhf import load_hh_rlhf
from otalign.data.preference import load_preference_data
from otalign.data.prompts import load_prompts
from otalign.data.sft import load_sft_data
from otalign.data.splits import paper_split, stage_rows
from otalign.data.tldr import load_tldr

FIXTURES = Path(__file__).parent / "fixtures"
HH = str(FIXTURES / "hh_rlhf.jsonl")
TLDR = str(FIXTURES / "tldr_comparisons.jsonl")
APPS = str(FIXTURES / "apps.jsonl")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_hh_rlhf_golden():
    result = load_hh_rlhf(HH)
    assert result.rows == [
        {
            "prompt": [user("What is a good name for a cat?")],
            "chosen": [assistant("Many people like the name Luna.")],
            "rejected": [assistant("I don't know.")],
        },
        {
            "prompt": [user("How do I boil an egg?"), assistant("Do you want it soft or hard?"), user("Hard, please.")],
            "chosen": [assistant("Boil it for about ten minutes, then cool it in cold water.")],
            "rejected": [assistant("Just put it in the microwave.")],
        },
        {
            "prompt": [user("Can you help me write a poem?")],
            "chosen": [assistant("Sure!\n\nThe sun goes down,\nthe stars come out.")],
            "rejected": [assistant("No.")],
        },
    ]
    assert result.summary(HH) == f"{HH}: kept 3 of 3 rows"


def test_hh_rlhf_dahoas_form_gives_the_same_row():
    assert load_hh_rlhf(str(FIXTURES / "hh_rlhf_dahoas.jsonl")).rows == load_hh_rlhf(HH).rows[:1]


def test_tldr_golden():
    assert load_tldr(TLDR).rows == [
        {
            "prompt": "SUBREDDIT: r/Cooking\n\nTITLE: How do I stop over-salting my food?\n\nPOST: I have been "
            "learning to cook for a month.\nEvery dish I make is too salty and my roommates complain.\n\nTL;DR:",
            "chosen": " I over-salt everything I cook, how do I stop?",
            "rejected": " cooking is hard",
        },
        {
            "prompt": "SUBREDDIT: r/dogs\n\nTITLE: Dog barks at cars\n\nPOST: My dog barks at every car that passes "
            "by.\n\nTL;DR:",
            "chosen": " My dog barks at passing cars; how can I train him to stop?",
            "rejected": " my dog",
        },
        {
            "prompt": "TITLE: Storm hits coast\n\nA large storm reached the coast on Monday.\nThousands lost power."
            "\n\nTL;DR:",
            "chosen": " A storm hit the coast and cut power to thousands.",
            "rejected": " weather",
        },
    ]


def test_apps_golden():
    assert load_apps(APPS).rows == [
        {
            "prompt": "\nQUESTION:\nRead two integers a and b and print their sum.\n"
            "Use Standard Input format\nANSWER:\n",
            "tests": {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"], "fn_name": None},
            "problem_id": 0,
            "difficulty": "introductory",
        },
        {
            "prompt": "\nQUESTION:\nReturn the square of x.\nclass Solution:\n    def square(self, x):\n"
            "Use Call-Based format\nANSWER:\n",
            "tests": {"inputs": [[2], [3]], "outputs": [[4], [9]], "fn_name": "square"},
            "problem_id": 1,
            "difficulty": "interview",
        },
    ]


def test_converted_rows_feed_the_trainers_readers(tmp_path):
    pairs = write_jsonl(load_hh_rlhf(HH).rows, tmp_path / "hh.jsonl")
    assert len(load_preference_data(str(pairs))) == 3
    summaries = write_jsonl(load_tldr(TLDR).rows, tmp_path / "tldr.jsonl")
    assert load_preference_data(str(summaries))[0].chosen.startswith(" I over-salt")
    prompts = write_jsonl(load_apps(APPS).rows, tmp_path / "apps.jsonl")
    assert load_prompts(str(prompts))[1].endswith("ANSWER:\n")


HH_ROW = json.loads(Path(HH).read_text().splitlines()[0])
TLDR_ROW = json.loads(Path(TLDR).read_text().splitlines()[0])
APPS_ROW = json.loads(Path(APPS).read_text().splitlines()[0])


def _with(row: dict, path: str, value) -> dict:
    row = json.loads(json.dumps(row))
    *parents, last = path.split(".")
    target = row
    for part in parents:
        target = target[part]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return row


@pytest.mark.parametrize(
    ("loader", "good", "bad", "message"),
    [
        (load_hh_rlhf, HH_ROW, _with(HH_ROW, "rejected", KeyError), "field 'rejected': missing"),
        (load_hh_rlhf, HH_ROW, _with(HH_ROW, "chosen", 3), "field 'chosen': expected a string, got int"),
        (load_hh_rlhf, HH_ROW, _with(HH_ROW, "chosen", "Hello"), "field 'chosen': expected a transcript"),
        (
            load_hh_rlhf,
            HH_ROW,
            _with(HH_ROW, "chosen", "\n\nHuman: Hi?\n\nAssistant: "),
            "field 'chosen': the last Assistant turn is empty",
        ),
        (
            load_hh_rlhf,
            HH_ROW,
            _with(HH_ROW, "rejected", "\n\nHuman: Another question?\n\nAssistant: No."),
            "field 'rejected': the chosen and rejected transcripts differ before their last reply",
        ),
        (load_hh_rlhf, HH_ROW, HH_ROW, ": duplicate of row 1"),
        (load_tldr, TLDR_ROW, _with(TLDR_ROW, "info.title", ""), "field 'info.title': empty text"),
        (load_tldr, TLDR_ROW, _with(TLDR_ROW, "choice", 2), "field 'choice': expected 0 or 1, got 2"),
        (load_tldr, TLDR_ROW, _with(TLDR_ROW, "summaries", []), "field 'summaries': expected a list of two"),
        (
            load_tldr,
            TLDR_ROW,
            _with(TLDR_ROW, "summaries", [{"text": " a"}, {"text": None}]),
            "field 'summaries\\[1\\].text': expected a non-empty string, got None",
        ),
        (load_apps, APPS_ROW, _with(APPS_ROW, "input_output", ""), "field 'input_output': the problem has no tests"),
        (
            load_apps,
            APPS_ROW,
            _with(APPS_ROW, "input_output", json.dumps({"inputs": ["1"], "outputs": []})),
            "field 'input_output': expected lists 'inputs' and 'outputs' of equal length",
        ),
        (load_apps, APPS_ROW, _with(APPS_ROW, "question", KeyError), "field 'question': missing"),
    ],
)
def test_broken_rows_are_rejected_with_file_row_and_field(tmp_path, loader, good, bad, message):
    path = tmp_path / "data.jsonl"
    write_jsonl([good, bad], path)
    with pytest.raises(ValueError, match=f"^{path}, row 2{'' if message.startswith(':') else ', '}{message}"):
        loader(str(path))


def test_skipping_counts_every_left_out_row(tmp_path):
    empty_reply = _with(HH_ROW, "chosen", "\n\nHuman: Hi?\n\nAssistant:")
    rows = [HH_ROW, empty_reply, HH_ROW, "not an object", _with(HH_ROW, "rejected", KeyError), empty_reply]
    path = write_jsonl(rows, tmp_path / "hh.jsonl")
    result = load_hh_rlhf(str(path), on_error="skip")
    assert len(result.rows) == 1
    assert result.skipped == {
        "empty response": [2, 6],
        "duplicate": [3],
        "not an object": [4],
        "missing field": [5],
    }
    assert result.summary("hh") == (
        "hh: kept 1 of 6 rows; skipped 1 duplicate (rows 3); 2 empty response (rows 2, 6); "
        "1 missing field (rows 5); 1 not an object (rows 4)"
    )


def test_nothing_usable_is_an_error():
    with pytest.raises(ValueError, match="kept 0 of 1 rows; skipped 1 not an object .*no usable row"):
        convert_rows([3], "src", dict, on_error="skip")


def test_paper_split_is_seeded_disjoint_and_20_40_40():
    rows = list(range(101))
    split = paper_split(rows, seed=3)
    assert [len(split[s]) for s in ("sft", "reward", "rl")] == [20, 40, 41]
    assert sorted(split["sft"] + split["reward"] + split["rl"]) == rows
    assert paper_split(rows, seed=3) == split != paper_split(rows, seed=4)
    with pytest.raises(ValueError, match="summing to 1"):
        paper_split(rows, fractions=(0.5, 0.5, 0.5))


def test_stage_rows_feed_each_stage(tmp_path):
    rows = load_hh_rlhf(HH).rows
    stages = stage_rows(paper_split(rows, seed=0, fractions=(1 / 3, 1 / 3, 1 / 3)))
    assert stages["sft"][0]["completion"] == [r for r in rows if r["prompt"] == stages["sft"][0]["prompt"]][0]["chosen"]
    load_sft_data(str(write_jsonl(stages["sft"], tmp_path / "sft.jsonl")))
    load_preference_data(str(write_jsonl(stages["reward"], tmp_path / "reward.jsonl")))
    assert load_prompts(str(write_jsonl(stages["rl"], tmp_path / "rl.jsonl"))) == [stages["rl"][0]["prompt"]]


def test_builtin_demo_preferences_prefer_positive_replies():
    from otalign.rewards import sentiment_reward

    pairs = load_preference_data("builtin")
    assert len(pairs) == 80 and all(p.prompt[0]["role"] == "user" for p in pairs)
    chosen = sentiment_reward([], [p.chosen[0]["content"] for p in pairs])
    rejected = sentiment_reward([], [p.rejected[0]["content"] for p in pairs])
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))
