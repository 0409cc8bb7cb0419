"""Evaluation: pairwise judges, win rates with randomised answer order, and the ``otalign eval`` run."""

from __future__ import annotations

from .http_judge import HostUnreachable, HTTPJudge, JudgeError
from .judges import ChatModelJudge, Judge, Judgement, RewardJudge
from .parsing import parse_verdict
from .templates import TEMPLATES, render_judge_prompt
from .winrate import Comparison, WinRate, compare, mean_std, subsample

__all__ = [
    "TEMPLATES",
    "ChatModelJudge",
    "Comparison",
    "HTTPJudge",
    "HostUnreachable",
    "Judge",
    "JudgeError",
    "Judgement",
    "RewardJudge",
    "WinRate",
    "compare",
    "mean_std",
    "parse_verdict",
    "render_judge_prompt",
    "subsample",
]
