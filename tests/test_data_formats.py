"""TRL's row forms on the shipped tiny model: language-modeling ``text`` rows for SFT (TRL's tokenization, every
token trained, ``dataset_text_field``), and every conversational form (prompt/completion, prompt/chosen/rejected,
messages) through the tiny model's prefix-preserving chat template, cut where TRL's rule cuts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otalign.data.preference import encode, load_preference_data
from otalign.data.sft import IGNORE_INDEX, SFTExample, encode_sft, load_sft_data, parse_sft_rows
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import PreferenceConfig, PreferenceTrainer
from otalign.trainers.sft import SFTConfig, SFTTrainer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FIXTURES = Path(__file__).parent / "fixtures"
USER = {"role": "user", "content": "write about the cat ."}
REPLY = {"role": "assistant", "content": "the cat is good ."}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """TRL's rule for where a completion starts: the tokens the prompt and prompt + completion share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# --- language-modeling rows ---------------------------------------------------------------------------------


def test_text_rows_are_tokenized_as_trl_and_train_every_token():
    tokenizer = tiny_tokenizer()
    ids, labels = encode_sft(tokenizer, SFTExample(text="the cat is good ."), "row 1")
    assert ids == tokenizer("the cat is good .<eos>")["input_ids"]  # TRL: tokenizer(text + eos_token)
    assert tokenizer.decode(ids) == "the cat is good . <eos>" and ids[-1] == tokenizer.eos_token_id
    assert labels == ids  # no -100 anywhere: the loss covers every token
    again, _ = encode_sft(tokenizer, SFTExample(text="the cat is good . <eos>"), "row 2")
    assert again == ids  # a text that already ends with the EOS token does not get a second one


def test_text_rows_load_from_the_text_field_or_the_one_named(tmp_path):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "the cat is good ."}, {"text": "a dog", "id": 2}])
    assert load_sft_data(path) == [SFTExample(text="the cat is good ."), SFTExample(text="a dog")]
    named = write_jsonl(tmp_path / "named.jsonl", [{"content": "the sun", "text": 3}])
    assert load_sft_data(named, dataset_text_field="content") == [SFTExample(text="the sun")]


def test_the_first_row_sets_the_form_in_trls_order():
    both = [{"prompt": "a", "completion": "b", "text": "c"}]  # a prompt makes a prompt/completion row
    assert parse_sft_rows(both, "d") == [SFTExample(prompt="a", completion="b")]
    chat = [{"messages": [USER, REPLY], "text": "c"}]  # then messages, then the text field
    assert parse_sft_rows(chat, "d") == [SFTExample(messages=[USER, REPLY])]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"prompt": "a", "completion": "b"}, r"^d\.jsonl, row 3: missing field 'text' \(fields: \['completion'"),
        ({"text": "   "}, r"^d\.jsonl, row 3, field 'text': empty text$"),
        ({"text": [USER]}, r"^d\.jsonl, row 3, field 'text' \(dataset_text_field\): expected a string, got list"),
    ],
)
def test_bad_text_rows_name_the_row_and_field(second, message):
    from otalign.data.reading import Rows

    rows = Rows([{"text": "good"}, second], "d.jsonl", numbers=[1, 3])
    with pytest.raises(ValueError, match=message):
        parse_sft_rows(rows, "d.jsonl")


def test_a_row_of_no_known_form_names_every_form():
    with pytest.raises(ValueError, match=r"^d, row 1: expected fields 'prompt' and 'completion', 'messages', or "):
        parse_sft_rows([{"body": "x"}], "d")
    with pytest.raises(ValueError, match=r"or 'body' \(dataset_text_field\); got \['txt'\]$"):
        parse_sft_rows([{"txt": "x"}], "d", dataset_text_field="body")


def test_sft_trainer_on_text_rows_with_dataset_text_field(tmp_path):
    rows = [{"body": f"the {w} is good ."} for w in ("cat", "dog", "sun", "tree")]
    config = SFTConfig(
        output_dir=str(tmp_path),
        dataset_name=write_jsonl(tmp_path / "lm.jsonl", rows),
        dataset_text_field="body",
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        progress_bar=False,
        save_model=False,
    )
    tokenizer = tiny_tokenizer()
    trainer = SFTTrainer(config, model=tiny_causal_lm(tokenizer), tokenizer=tokenizer)
    assert all(ids == labels for ids, labels in trainer.train_rows)
    assert tokenizer.decode(trainer.train_rows[0][0]) == "the cat is good . <eos>"
    history = trainer.train()
    assert history[-1]["loss"] < history[0]["loss"]


# --- conversational rows on the tiny model's chat template --------------------------------------------------


@pytest.mark.parametrize(
    "conversation",
    [
        [USER],
        [{"role": "system", "content": "you are nice ."}, USER],
        [USER, REPLY, {"role": "user", "content": "a ?"}],
    ],
)
def test_the_tiny_chat_template_is_prefix_preserving(conversation):
    tokenizer = tiny_tokenizer()
    head = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template([*conversation, REPLY], tokenize=False)
    assert whole.startswith(head) and whole[len(head) :] == "the cat is good . <eos> "


def cut_like_trl(tokenizer, prompt: list, completion: list) -> tuple[list[int], list[int]]:
    """TRL's conversational prompt/completion tokenization: both rendered and tokenized by the template, the
    completion starting where the two token lists part."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    whole = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    cut = common_prefix_length(prompt_ids["input_ids"], whole)
    return whole[:cut], whole[cut:]


def test_prompt_completion_rows_train_on_the_tiny_model(tmp_path):
    rows = [{"prompt": [USER], "completion": [REPLY]}, {"prompt": [USER], "completion": [{**REPLY, "content": "a"}]}]
    tokenizer = tiny_tokenizer()
    config = SFTConfig(
        output_dir=str(tmp_path),
        dataset_name=write_jsonl(tmp_path / "chat.jsonl", rows),
        max_steps=1,
        per_device_train_batch_size=2,
        progress_bar=False,
        save_model=False,
    )
    trainer = SFTTrainer(config, model=tiny_causal_lm(tokenizer), tokenizer=tokenizer)
    ids, labels = trainer.train_rows[0]
    prompt, completion = cut_like_trl(tokenizer, [USER], [REPLY])
    assert ids == prompt + completion and labels == [IGNORE_INDEX] * len(prompt) + completion
    assert tokenizer.decode(completion) == "the cat is good . <eos>"
    (metrics,) = trainer.train()
    assert metrics["loss"] > 0


def test_prompt_chosen_rejected_rows_train_on_the_tiny_model(tmp_path):
    tokenizer = tiny_tokenizer()
    config = PreferenceConfig(
        output_dir=str(tmp_path),
        dataset_name=str(FIXTURES / "preference_chat.jsonl"),
        max_steps=1,
        per_device_train_batch_size=4,
        progress_bar=False,
        save_model=False,
    )
    trainer = PreferenceTrainer(
        config, policy=tiny_causal_lm(tokenizer), ref_model=tiny_causal_lm(tokenizer), tokenizer=tokenizer
    )
    pair = load_preference_data(config.dataset_name)[0]
    for side in ("chosen", "rejected"):
        expected = cut_like_trl(tokenizer, pair.prompt, getattr(pair, side))
        assert trainer.sequences[("train", 0, side)] == expected
        assert encode(tokenizer, pair.prompt, getattr(pair, side), "row 1") == expected
    (metrics,) = trainer.train()
    assert metrics["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at the start


def test_messages_rows_train_on_the_tiny_model(tmp_path):
    tokenizer = tiny_tokenizer()
    config = SFTConfig(
        output_dir=str(tmp_path),
        dataset_name=str(FIXTURES / "sft_chat.jsonl"),
        max_steps=1,
        per_device_train_batch_size=2,
        progress_bar=False,
        save_model=False,
    )
    trainer = SFTTrainer(config, model=tiny_causal_lm(tokenizer), tokenizer=tokenizer)
    ids, labels = trainer.train_rows[0]
    messages = load_sft_data(config.dataset_name)[0].messages
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == "the cat is good . <eos> the dog is great . <eos>"  # both assistant turns, nothing else
    (metrics,) = trainer.train()
    assert metrics["loss"] > 0
