"""Datasets: the prompt sets RL trains and evaluates on (built-in or local files), validated up front."""

from __future__ import annotations

from .prompts import BUILTIN, Prompt, load_prompts, parse_prompts, render_prompt, validate_prompt

__all__ = ["BUILTIN", "Prompt", "load_prompts", "parse_prompts", "render_prompt", "validate_prompt"]
