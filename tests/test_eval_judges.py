"""Reward judges (function and model) and the local chat-model judge behind the one ``Judge`` interface."""

from __future__ import annotations

import numpy as np
import pytest
from test_rewards import tiny_reward_model

from otalign.eval import TEMPLATES, ChatModelJudge, RewardJudge, WinRate, compare, render_judge_prompt
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.rewards import FunctionReward, build_reward

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_reward_function_judge_prefers_the_higher_score_and_ties_within_tolerance():
    judge = RewardJudge(FunctionReward(lambda prompts, responses: [float(len(r)) for r in responses], name="length"))
    out = judge.judge(["p"] * 3, ["long answer", "ab", "abc"], ["short", "abcd", "abd"])
    assert [j.verdict for j in out] == ["A", "B", "E"]
    assert out[0].raw == "11 vs 5"
    loose = RewardJudge(judge.reward, tie_tolerance=2.0)
    assert [j.verdict for j in loose.judge(["p"], ["ab"], ["abcd"])] == ["E"]


def test_builtin_sentiment_judge_in_a_win_rate():
    judge = RewardJudge(build_reward("sentiment"))
    good, bad = ["what a wonderful happy day"] * 20, ["an awful terrible sad day"] * 20
    assert WinRate.of(compare(judge, ["p"] * 20, good, bad, np.random.default_rng(0))).rate == 1.0


def test_reward_model_judge_scores_text(tmp_path):
    tokenizer = tiny_tokenizer()
    tiny_reward_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = RewardJudge(build_reward(reward_model=tmp_path, retokenize=True))  # scores prompt + response text
    first, second = (
        [" good day", " bad day", " the cat"],
        [" bad day", " good day", " the cat"],
    )
    out = judge.judge(["tell me"] * 3, first, second)
    scores = [[float(s) for s in j.raw.split(" vs ")] for j in out]
    assert out[2].verdict == "E"  # the same text scores the same
    assert scores[0] == pytest.approx(scores[1][::-1], rel=1e-4)
    assert {out[0].verdict, out[1].verdict} == {"A", "B"}


def test_templates_hold_the_papers_wording():
    text = render_judge_prompt("summarization", "ARTICLE", "SUM1", "SUM2")
    assert "Relevance - selection of important content" in text and "Summary A:\nSUM1" in text
    assert text.endswith("output 'E'):")
    assert '"comparison" and "choice" as keys' in TEMPLATES["helpfulness"]
    with pytest.raises(ValueError, match="unknown judge template"):
        render_judge_prompt("poetry", "p", "a", "b")


def test_chat_model_judge_runs_and_counts_malformed_answers():
    tokenizer = tiny_tokenizer()
    judge = ChatModelJudge(
        tiny_causal_lm(tokenizer, seed=0),
        tokenizer,
        "{prompt} a : {response_a} , b : {response_b} ?",
        max_new_tokens=4,
        batch_size=2,
    )
    comparisons = compare(
        judge, ["tell me about a cat"] * 3, ["good cat"] * 3, ["bad dog"] * 3, np.random.default_rng(0)
    )
    counts = WinRate.of(comparisons)
    assert counts.wins + counts.ties + counts.losses + counts.malformed == 3
    assert all(isinstance(c.raw, str) for c in comparisons)
    # greedy: the same inputs give the same answers
    again = compare(judge, ["tell me about a cat"] * 3, ["good cat"] * 3, ["bad dog"] * 3, np.random.default_rng(0))
    assert [c.raw for c in again] == [c.raw for c in comparisons]
