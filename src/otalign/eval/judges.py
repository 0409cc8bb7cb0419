"""Pairwise judges behind one interface: ``judge.judge(prompts, first, second) -> [Judgement]``.

A judge sees each prompt with two answers in the order shown (``first`` as A, ``second`` as B) and says
``A``, ``B`` or ``E`` (equally good). Judges here:

- :class:`RewardJudge`: a reward model or a reward function scores both answers; the higher wins;
- :class:`ChatModelJudge`: a local Hugging Face chat model prompted with the paper's pairwise templates,
  its greedy answer read by :func:`~otalign.eval.parsing.parse_verdict`;
- :class:`~otalign.eval.http_judge.HTTPJudge`: an OpenAI-compatible chat-completions endpoint (GPT-4 in the paper).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from otalign.rewards import check_scores

from .parsing import parse_verdict
from .templates import render_judge_prompt


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one pair (``A``, ``B``, ``E``; None: malformed) and its raw output."""

    verdict: str | None
    raw: str


class Judge(ABC):
    """Compares two answers per prompt."""

    name: str = "judge"

    @abstractmethod
    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Judgement]:
        """One :class:`Judgement` per prompt on ``first[i]`` (shown as A) vs ``second[i]`` (shown as B)."""


class RewardJudge(Judge):
    """The answer with the higher reward wins; scores within ``tie_tolerance`` of each other are a tie.

    Args:
        reward: an :class:`otalign.rewards.Reward` that reads text: a reward function, or a reward model built
            with ``retokenize=True`` (it tokenizes the text itself; the token-id inputs are placeholders).
        tie_tolerance: absolute score difference counted as a tie.
    """

    def __init__(self, reward, tie_tolerance: float = 0.0) -> None:
        self.reward = reward
        self.tie_tolerance = tie_tolerance
        self.name = f"reward:{reward.name}"

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Judgement]:
        a, b = self._scores(prompts, first), self._scores(prompts, second)
        out = []
        for sa, sb in zip(a, b, strict=True):
            verdict = "E" if abs(sa - sb) <= self.tie_tolerance else ("A" if sa > sb else "B")
            out.append(Judgement(verdict, f"{sa:.6g} vs {sb:.6g}"))
        return out

    def _scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        placeholder = torch.zeros((len(responses), 1), dtype=torch.long)
        scores = self.reward(list(prompts), list(responses), placeholder, placeholder.bool())
        check_scores(torch.as_tensor(scores), self.reward.name)
        return scores.tolist()


class ChatModelJudge(Judge):
    """A local causal LM asked the pairwise question with ``template``; greedy answer parsed into a verdict.

    Args:
        model, tokenizer: an unwrapped Hugging Face causal LM and its tokenizer (chat template used if it has one).
        template: ``summarization``, ``helpfulness`` (:data:`~otalign.eval.templates.TEMPLATES`) or a format string.
        max_new_tokens: length of the judge's answer.
        batch_size: judge prompts per generation batch.
        max_prompt_length: longest judge prompt accepted (tokens).
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: str = "helpfulness",
        *,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        max_prompt_length: int = 4096,
    ) -> None:
        from otalign.generation import SamplingParams

        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_k=1)  # top-1: greedy
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.name = f"chat:{getattr(model.config, '_name_or_path', '') or type(model).__name__}"

    @torch.no_grad()
    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Judgement]:
        from .generations import sample_responses

        questions = [
            render_judge_prompt(self.template, p, a, b) for p, a, b in zip(prompts, first, second, strict=True)
        ]
        answers = sample_responses(
            self.model,
            self.tokenizer,
            questions,
            [0] * len(questions),
            self.params,
            batch_size=self.batch_size,
            max_prompt_length=self.max_prompt_length,
        )
        return [Judgement(parse_verdict(text), text) for text in answers]
