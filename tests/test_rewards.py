"""Rewards: built-in sentiment, Python callables, Hugging Face reward models and the tokenizer check."""

from __future__ import annotations

import pytest
import torch

from otalign.models.tiny import WORDS, tiny_tokenizer
from otalign.rewards import FunctionReward, ModelReward, build_reward, check_scores, sentiment_reward

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tiny_reward_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


def test_sentiment_reward_orders_positive_above_negative():
    scores = sentiment_reward(["p", "p", "p"], ["What a wonderful, happy day!", "The sky.", "I hate this awful mess."])
    assert scores[0] > 0.5 and abs(scores[1]) < 1e-9 and scores[2] < -0.5
    reward = build_reward("sentiment")
    out = reward(["p"], ["great"], torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))
    assert out.dtype == torch.float32 and out.shape == (1,) and out.item() > 0


def test_callable_reward_is_checked():
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    assert build_reward(lambda p, r: [len(x) for x in r])(["a", "b"], ["xy", "z"], ids, mask).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        FunctionReward(lambda p, r: [1.0])(["a", "b"], ["x", "y"], ids, mask)
    scores = FunctionReward(lambda p, r: [float("nan"), 1.0])(["a", "b"], ["x", "y"], ids, mask)
    assert scores.isnan().tolist() == [True, False]  # returned as given: the caller's guard decides
    with pytest.raises(ValueError, match="non-finite score nan for prompt row 7"):
        check_scores(scores, "nan_first", rows=[7, 8])
    with pytest.raises(TypeError):
        FunctionReward("sentiment")


def test_unknown_reward_name_and_ambiguous_spec():
    names = r"\['apps_execution', 'arithmetic', 'sentiment'\]"
    with pytest.raises(ValueError, match=rf"unknown reward function 'joy'; choose one of {names}"):
        build_reward("joy")
    with pytest.raises(ValueError, match="exactly one"):
        build_reward("sentiment", "some/model")
    with pytest.raises(ValueError, match="exactly one"):
        build_reward()


def test_reward_model_scores_last_token_and_matches_direct_call(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_reward_model(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = build_reward(reward_model=str(tmp_path), policy_tokenizer=tokenizer)
    assert isinstance(reward, ModelReward)
    texts = ["the cat is good", "a bad day"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    batch = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.bool)
    for i, row in enumerate(ids):
        batch[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = True
    scores = reward(["", ""], texts, batch, mask)
    for i, row in enumerate(ids):
        alone = model(input_ids=torch.tensor([row])).logits[0, 0]
        assert scores[i].item() == pytest.approx(alone.item(), abs=1e-5)


def test_reward_model_with_another_tokenizer_is_rejected_unless_retokenizing():
    policy_tokenizer = tiny_tokenizer()
    other = tiny_tokenizer(words=tuple(reversed(WORDS)))  # same words, different ids
    model = tiny_reward_model(other)
    with pytest.raises(ValueError, match="differs from the policy's.*reward_retokenize"):
        ModelReward(model, other, policy_tokenizer)
    reward = ModelReward(model, other, policy_tokenizer, retokenize=True)
    ids = torch.zeros(1, 3, dtype=torch.long)
    score = reward(["the cat "], ["is good"], ids, torch.ones_like(ids, dtype=torch.bool))
    direct = model(input_ids=torch.tensor([other("the cat is good")["input_ids"]])).logits[0, 0]
    assert score.item() == pytest.approx(direct.item(), abs=1e-5)


def test_reward_model_must_have_one_output():
    tokenizer = tiny_tokenizer()
    model = tiny_reward_model(tokenizer)
    model.config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels=1"):
        ModelReward(model, tokenizer, tokenizer)


def test_function_reward_receives_the_columns_it_declares():
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    columns = {"answer": ["4", "7"], "source": ["x", "y"]}
    seen = {}

    def exact(prompts, responses, answer):
        return [float(r == a) for r, a in zip(responses, answer, strict=True)]

    def everything(prompts, responses, **cols):
        seen.update(cols)
        return [0.0, 0.0]

    assert FunctionReward(exact)(["p", "q"], ["4", "8"], ids, mask, columns).tolist() == [1.0, 0.0]
    FunctionReward(everything)(["p", "q"], ["4", "8"], ids, mask, columns)
    assert seen == columns
    assert FunctionReward(lambda p, r: [1.0, 2.0])(["p", "q"], ["a", "b"], ids, mask, columns).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"'exact' needs column\(s\) \['answer'\]"):
        FunctionReward(exact)(["p", "q"], ["4", "8"], ids, mask, {"source": ["x", "y"]})


def test_arithmetic_task_rows_and_exact_reward():
    from otalign.data import load_prompt_rows
    from otalign.rewards import arithmetic_reward

    train, test = load_prompt_rows("arithmetic", "train"), load_prompt_rows("arithmetic", "test")
    assert len(train) == 70 and len(test) == 30
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    a, b = (int(x) for x in train[0]["prompt"].removeprefix("What is ").split("?")[0].split(" + "))
    assert train[0]["answer"] == str(a + b)
    scores = arithmetic_reward(["q"] * 4, ["The answer is 12.", "12 or 13", "twelve", "3 + 9 = 12"], ["12"] * 4)
    assert scores == [1.0, 0.0, 0.0, 1.0]


def test_prompt_rows_keep_their_columns(tmp_path):
    from otalign.data import load_prompt_rows, load_prompts, prompt_columns

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n')
    rows = load_prompt_rows(str(path))
    assert rows == [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    assert load_prompts(str(path)) == ["a", "b"] and prompt_columns(rows) == ["answer"]
    with pytest.raises(ValueError, match=r"row 2: missing field\(s\) \['answer'\]"):
        prompt_columns([{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
