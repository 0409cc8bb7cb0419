"""Accelerate-native trainers and their shared infrastructure (config, checkpoints, metrics, progress)."""

from __future__ import annotations

from otalign.guard import ConvergenceError, ConvergenceWarning, NonFiniteError
from otalign.runs import read_metrics

from .base import BaseTrainer
from .checkpoint import CheckpointManager, TrainerState, latest_checkpoint, list_checkpoints
from .config import ConfigError, TrainerConfig, parse_config
from .critic_free import CriticFreeConfig, CriticFreeTrainer, GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from .metrics import MetricsLogger
from .ppo import PPOConfig, PPOTrainer
from .preference import PreferenceConfig, PreferenceTrainer
from .reward import RewardConfig, RewardTrainer
from .rl import BetaController, RLConfig, RLTrainer
from .sft import SFTConfig, SFTTrainer

__all__ = [
    "BaseTrainer",
    "BetaController",
    "CheckpointManager",
    "ConfigError",
    "ConvergenceError",
    "ConvergenceWarning",
    "CriticFreeConfig",
    "CriticFreeTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "MetricsLogger",
    "NonFiniteError",
    "PPOConfig",
    "PPOTrainer",
    "PreferenceConfig",
    "PreferenceTrainer",
    "RLConfig",
    "RLOOConfig",
    "RLOOTrainer",
    "RLTrainer",
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
