"""Rows longer than ``max_length``: TRL's ``keep_start``/``keep_end`` truncation or an error naming the row, one rule
(:mod:`otalign.data.truncation`) for the ``dpo``, ``sft`` and ``reward`` trainers, checked token by token."""

from __future__ import annotations

import pytest

from otalign.data.preference import PreferencePair
from otalign.data.sft import IGNORE_INDEX, SFTExample
from otalign.data.truncation import truncate_pair
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import ConfigError, PreferenceConfig, PreferenceTrainer
from otalign.trainers.reward import RewardConfig, RewardTrainer
from otalign.trainers.sft import SFTConfig, SFTTrainer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT, COMPLETION = [1, 2, 3, 4], [5, 6, 7]


@pytest.mark.parametrize(
    ("mode", "max_length", "expected"),
    [
        ("keep_start", 5, ([1, 2, 3, 4], [5])),  # the prompt kept, the completion cut on the right
        ("keep_end", 5, ([3, 4], [5, 6, 7])),  # the completion kept, the prompt cut on the left
        ("keep_end", 2, ([6], [7])),  # no prompt left: the first kept token (never predicted) stands in
        ("keep_start", 7, (PROMPT, COMPLETION)),  # fits: unchanged, in every mode
        ("error", 7, (PROMPT, COMPLETION)),
    ],
)
def test_truncate_pair_keeps_the_span_of_its_mode(mode, max_length, expected):
    assert truncate_pair(PROMPT, COMPLETION, max_length, mode, "data.jsonl, row 2") == expected


def test_error_mode_and_an_empty_completion_name_the_row():
    with pytest.raises(ValueError, match=r"^data.jsonl, row 2: 7 tokens, more than max_length=6 \(truncation_mode"):
        truncate_pair(PROMPT, COMPLETION, 6, "error", "data.jsonl, row 2")
    with pytest.raises(ValueError, match="^data.jsonl, row 2: the prompt alone has 4 tokens.* no completion token"):
        truncate_pair(PROMPT, COMPLETION, 4, "keep_start", "data.jsonl, row 2")


def test_defaults_follow_trl_and_unknown_modes_are_refused():
    assert PreferenceConfig().truncation_mode == "keep_end"  # TRL 1.16 DPOConfig: keep_start (README: why)
    assert SFTConfig().truncation_mode == "keep_start"  # TRL SFTConfig
    assert RewardConfig().truncation_mode == "error"  # TRL drops such pairs; we never drop silently
    with pytest.raises(ConfigError, match="unknown truncation_mode 'keep_middle'"):
        SFTConfig(truncation_mode="keep_middle")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


def settings(tmp_path, **overrides) -> dict:
    return dict(output_dir=str(tmp_path), max_length=8, progress_bar=False, save_model=False, **overrides)


@pytest.mark.parametrize(
    ("mode", "prompt", "completion"),
    [("keep_end", "cat .", "the cat is good . <eos>"), ("keep_start", "write about the cat .", "the cat is")],
)
def test_dpo_and_reward_rows_are_cut_to_max_length(tmp_path, mode, prompt, completion):
    tokenizer = tiny_tokenizer()
    pair = PreferencePair("write about the cat .", "the cat is good .", "the cat is bad .")
    expected = (ids(tokenizer, prompt), ids(tokenizer, completion))
    dpo = PreferenceTrainer(
        PreferenceConfig(**settings(tmp_path / "dpo", truncation_mode=mode)),
        policy=tiny_causal_lm(tokenizer),
        ref_model=tiny_causal_lm(tokenizer),
        tokenizer=tokenizer,
        train_data=[pair],
    )
    assert dpo.sequences[("train", 0, "chosen")] == expected
    reward = RewardTrainer(
        RewardConfig(**settings(tmp_path / "rm", truncation_mode=mode)),
        model=tiny_causal_lm(tokenizer),
        tokenizer=tokenizer,
        train_data=[pair],
    )
    assert reward.train_pairs[0][0] == expected


@pytest.mark.parametrize(
    ("mode", "kept", "trained"),
    [("keep_start", "write about the cat . the cat is", 3), ("keep_end", "cat . the cat is good . <eos>", 6)],
)
def test_sft_rows_and_labels_are_cut_alike(tmp_path, mode, kept, trained):
    tokenizer = tiny_tokenizer()
    trainer = SFTTrainer(
        SFTConfig(**settings(tmp_path, truncation_mode=mode)),
        model=tiny_causal_lm(tokenizer),
        tokenizer=tokenizer,
        train_data=[SFTExample("write about the cat .", "the cat is good .")],
    )
    [(row_ids, labels)] = trainer.train_rows
    assert row_ids == ids(tokenizer, kept)
    assert labels == [IGNORE_INDEX] * (8 - trained) + row_ids[8 - trained :]
