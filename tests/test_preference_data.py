"""Preference datasets: loading, row validation (file, row and field named), chat-template encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otalign.data.preference import LabeledCompletion, PreferencePair, encode, load_preference_data
from otalign.models.tiny import CHAT_TEMPLATE, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
ASSISTANT_TEMPLATE = CHAT_TEMPLATE
"""The tiny model's chat template: the prompt (with generation prompt) is a prefix of the whole conversation."""
NOT_PREFIX_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}answer :{% endif %}"
)
"""A template that renders ``answer :`` only as the generation prompt (the tiny model's before it was fixed): the
prompt with it is no prefix of the prompt and completion."""


def write_rows(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_fixtures_load_as_pairs_unpaired_and_chat():
    pairs = load_preference_data(str(FIXTURES / "preference_pairs.jsonl"))
    assert len(pairs) == 12 and all(isinstance(p, PreferencePair) for p in pairs)
    unpaired = load_preference_data(str(FIXTURES / "preference_unpaired.jsonl"))
    assert all(isinstance(e, LabeledCompletion) for e in unpaired)
    assert sum(e.label for e in unpaired) == 12 and sum(not e.label for e in unpaired) == 8
    chat = load_preference_data(str(FIXTURES / "preference_chat.jsonl"))
    assert chat[0].prompt == [{"role": "user", "content": "write about the cat ."}]


def test_json_list_and_reference_columns(tmp_path):
    path = tmp_path / "d.json"
    row = {"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -1, "ref_rejected_logps": -2.5, "id": 7}
    path.write_text(json.dumps([row, row]))
    pairs = load_preference_data(str(path))  # the extra column "id" is ignored
    assert pairs == [PreferencePair("a", "b", "c", -1.0, -2.5)] * 2


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
            r", row 2: missing field 'rejected'",
        ),
        ([{"prompt": "a", "chosen": "b", "rejected": " "}], r", row 1, field 'rejected': empty text"),
        (
            [{"prompt": "a", "chosen": 3, "rejected": "c"}],
            r", row 1, field 'chosen': expected a non-empty string or list",
        ),
        (
            [{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}],
            r", row 1, field 'chosen': mixes plain text and chat messages",
        ),
        (
            [{"prompt": [{"role": "user"}], "chosen": [], "rejected": []}],
            r", row 1, field 'prompt', message 0: need string 'role' and 'content'",
        ),
        (
            [{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": 0.5, "ref_rejected_logps": -1}],
            r", row 1, field 'ref_chosen_logps': expected a finite log-probability <= 0",
        ),
        (
            [{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -1.0}],
            r", row 1: give both 'ref_chosen_logps' and 'ref_rejected_logps'",
        ),
        (
            [
                {"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -1, "ref_rejected_logps": -2},
                {"prompt": "a", "chosen": "b", "rejected": "c"},
            ],
            r", row 2, field 'ref_chosen_logps': reference log-probs must be given in every row or in none",
        ),
        ([{"prompt": "a", "completion": "b", "label": "yes"}], r", row 1, field 'label': expected true or false"),
        (
            [{"prompt": "a", "completion": "b", "label": True}],
            ": unpaired data needs both desirable .* and undesirable",
        ),
        (["just text"], r", row 1: expected an object with fields"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    path = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match="bad.jsonl" + message):
        load_preference_data(path)


def test_unreadable_sources(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, row 2: not valid JSON"):
        load_preference_data(str(path))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty.json: the dataset is empty"):
        load_preference_data(str(empty))
    with pytest.raises(ValueError, match="unsupported extension '.csv'"):
        load_preference_data(write_rows(tmp_path / "d.csv", []))


def test_plain_text_gets_eos_and_chat_rows_get_the_template():
    tokenizer = tiny_tokenizer()
    prompt_ids, completion_ids = encode(tokenizer, "write about the cat .", "the cat is good .", "row 1")
    assert tokenizer.decode(prompt_ids) == "write about the cat ."
    assert tokenizer.decode(completion_ids) == "the cat is good . <eos>"

    prompt = [{"role": "user", "content": "write about the cat ."}]
    completion = [{"role": "assistant", "content": "the cat is good ."}]
    prompt_ids, completion_ids = encode(tokenizer, prompt, completion, "row 1")
    assert tokenizer.decode(prompt_ids) == "write about the cat . answer :"
    assert tokenizer.decode(completion_ids) == "the cat is good . <eos>"


def test_chat_rows_fail_clearly_without_a_usable_template():
    prompt = [{"role": "user", "content": "write about the cat ."}]
    completion = [{"role": "assistant", "content": "good ."}]
    with pytest.raises(ValueError, match="row 3: conversational rows need a tokenizer with a chat template"):
        encode(tiny_tokenizer(chat_template=False), prompt, completion, "row 3")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = NOT_PREFIX_TEMPLATE
    with pytest.raises(ValueError) as error:
        encode(tokenizer, prompt, completion, "row 3")
    message = str(error.value)
    assert message.startswith("row 3: the chat template does not render the conversation so far as a prefix")
    assert "\n" not in message and "after 'write about the cat . ' one has 'answer :', the other 'good . '" in message
    assert "chat_template_path" in message  # TRL's way out is named


def test_a_name_that_is_no_file_needs_the_datasets_package():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(FileNotFoundError, match="no such file, and loading a Hugging Face dataset needs"):
            load_preference_data("someone/no-such-dataset")
    else:
        pytest.skip("datasets is installed: the name would go to the hub")


def test_dataset_config_reaches_load_dataset_and_is_refused_for_local_files(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from otalign.data.sft import load_sft_data

    calls = []
    rows = [{"prompt": "hi", "chosen": "good", "rejected": "bad"}, {"prompt": "yo", "chosen": "fine", "rejected": "no"}]

    def load_dataset(path, name=None, *, split=None):  # stands in for the hub: tests never go online
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pairs = load_preference_data("someone/prefs", "validation", config="en")
    assert calls == [("someone/prefs", "en", "validation")] and pairs[1].chosen == "fine"
    with pytest.raises(ValueError, match=r"dataset_config='en' names a Hugging Face dataset's configuration"):
        load_preference_data(str(FIXTURES / "preference_pairs.jsonl"), config="en")
    with pytest.raises(ValueError, match="is local"):
        load_sft_data(str(FIXTURES / "sft_pairs.jsonl"), config="en")
