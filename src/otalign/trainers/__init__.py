"""Accelerate-native trainers and their shared infrastructure (config, checkpoints, metrics, progress)."""

from __future__ import annotations

from .base import BaseTrainer
from .checkpoint import CheckpointManager, TrainerState, latest_checkpoint, list_checkpoints
from .config import ConfigError, TrainerConfig, parse_config
from .metrics import MetricsLogger, read_metrics
from .ppo import DEFAULT_BETA, PPOConfig, PPOTrainer
from .preference import PreferenceConfig, PreferenceTrainer
from .reward import RewardConfig, RewardTrainer
from .sft import SFTConfig, SFTTrainer

__all__ = [
    "DEFAULT_BETA",
    "BaseTrainer",
    "CheckpointManager",
    "ConfigError",
    "MetricsLogger",
    "PPOConfig",
    "PPOTrainer",
    "PreferenceConfig",
    "PreferenceTrainer",
    "RewardConfig",
    "RewardTrainer",
    "SFTConfig",
    "SFTTrainer",
    "TrainerConfig",
    "TrainerState",
    "latest_checkpoint",
    "list_checkpoints",
    "parse_config",
    "read_metrics",
]
