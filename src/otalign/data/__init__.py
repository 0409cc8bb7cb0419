"""Datasets: prompt sets for RL, preference and SFT rows, the paper datasets' loaders and the paper's split."""

from __future__ import annotations

from .apps import APPS_MINI, apps_mini_path, load_apps, load_code_problems
from .arithmetic import arithmetic_rows
from .conversion import Converted, RowError
from .hh_rlhf import load_hh_rlhf
from .prompts import (
    BUILTIN,
    Prompt,
    load_prompt_rows,
    load_prompts,
    parse_prompts,
    prompt_columns,
    render_prompt,
    validate_prompt,
)
from .sft import SFTExample, load_sft_data
from .splits import paper_split, prepare_stage_files, stage_rows
from .tldr import load_tldr

__all__ = [
    "APPS_MINI",
    "BUILTIN",
    "Converted",
    "Prompt",
    "RowError",
    "SFTExample",
    "apps_mini_path",
    "arithmetic_rows",
    "load_apps",
    "load_code_problems",
    "load_hh_rlhf",
    "load_prompt_rows",
    "load_prompts",
    "load_sft_data",
    "load_tldr",
    "paper_split",
    "parse_prompts",
    "prepare_stage_files",
    "prompt_columns",
    "render_prompt",
    "stage_rows",
    "validate_prompt",
]
