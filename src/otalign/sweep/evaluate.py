"""The sweep's held-out evaluation: every trained policy and the reference, measured identically.

Each model answers the same held-out prompts with the same per-prompt sampling seeds (common random numbers,
:func:`otalign.eval.policy.evaluate_policy`), scored by one reward. Per response it records the reward,
the exact KL(pi || pi_ref) summed over its tokens (nats, full vocabulary, distributions
``softmax(logits / temperature)``), the Wasserstein distance to the reference summed over its tokens (one
:class:`~otalign.regularizers.WassersteinRegularizer` built from the reference's input embeddings with the same
solver settings for every model, whatever the model trained with) and, for the coherence analysis, the summed
top-k candidate spread (:func:`otalign.eval.analysis.candidate_spread`). The settings, the W solver's included,
are written into every ``eval.json``; an evaluation made with other settings is redone.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from otalign.config import ConfigError

from .config import SweepConfig, trainer_classes
from .layout import EVAL_FILE, read_json, write_json_atomic

_SETUPS: dict[str, EvalSetup] = {}


def base_field(config: SweepConfig, name: str, fallback):
    """The value every cell's command config has for ``name`` (the base, else the class default), or
    ``fallback`` when the command's config has no such field."""
    config_cls, _ = trainer_classes(config.command)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if name not in fields:
        return fallback
    base = config.base_values()
    if name in base:
        return base[name]
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else fallback


def eval_settings(config: SweepConfig) -> dict:
    """Everything that determines an evaluation, resolved (None fields filled from the base or the defaults)."""
    from otalign.regularizers import WassersteinRegularizer

    defaults = {n: p.default for n, p in inspect.signature(WassersteinRegularizer).parameters.items()}
    solver = {
        "lam": config.eval_w_lambda if config.eval_w_lambda is not None else defaults["lam"],
        "top_k": config.eval_w_top_k if config.eval_w_top_k is not None else defaults["top_k"],
        "metric": config.eval_w_metric or defaults["metric"],
        "knn": config.eval_w_knn if config.eval_w_knn is not None else defaults["knn"],
        "transport": config.eval_w_transport or defaults["transport"],
        "max_iter": config.eval_w_max_iter if config.eval_w_max_iter is not None else defaults["max_iter"],
        "tol": config.eval_w_tol if config.eval_w_tol is not None else defaults["tol"],
        "overrelaxation": defaults["overrelaxation"],
        "newton_steps": defaults["newton_steps"],
        "dust_cost": defaults["dust_cost"],
        "debias": False,
        "embeddings": "reference input embeddings",
    }
    reward_model = config.eval_reward_model
    reward_fn = config.eval_reward_fn
    if reward_fn is None and reward_model is None:
        reward_model = base_field(config, "reward_model_name_or_path", None)
        reward_fn = None if reward_model else (base_field(config, "reward_fn", None) or "sentiment")
        if isinstance(reward_fn, list):
            if len(reward_fn) != 1:
                raise ConfigError(f"the cells train on several rewards {reward_fn}; set eval_reward_fn to one of them")
            reward_fn = reward_fn[0]
    reference = (
        config.reference
        or base_field(config, "ref_model_name_or_path", None)
        or base_field(config, "model_name_or_path", "default")
    )

    def pick(own, name, fallback):
        return own if own is not None else base_field(config, name, fallback)

    return {
        "reference": reference,
        "prompts": config.eval_prompts,
        "split": config.eval_split,
        "num_prompts": config.num_eval_prompts,
        "seed": config.eval_seed,
        "max_new_tokens": pick(
            config.eval_max_new_tokens, "response_length", base_field(config, "max_completion_length", 64)
        ),
        "temperature": pick(config.eval_temperature, "temperature", 0.8),
        "top_k": pick(config.eval_top_k, "top_k", 50),
        "top_p": pick(config.eval_top_p, "top_p", 1.0),
        "use_chat_template": base_field(config, "use_chat_template", True),
        "max_prompt_length": base_field(config, "max_prompt_length", 512),
        "model_dtype": base_field(config, "model_dtype", "float32"),
        "reward_fn": reward_fn,
        "reward_model": reward_model,
        "wasserstein": solver,
        "coherence_top_k": config.coherence_top_k if "coherence" in config.analyses else None,
    }


@dataclass
class EvalSetup:
    """What every evaluation of a sweep shares: prompts and their columns, reference, reward, W solver, sampling."""

    settings: dict
    prompts: list
    columns: dict[str, list]
    texts: list[str]
    ids: list[list[int]]
    tokenizer: object
    reference: torch.nn.Module
    reward: object
    ot_regularizer: object
    embeddings: torch.Tensor
    params: object

    @classmethod
    def build(cls, settings: dict) -> EvalSetup:
        from otalign.data import load_prompt_rows, prompt_columns, render_prompt
        from otalign.eval.winrate import subsample
        from otalign.generation import SamplingParams, encode_prompts
        from otalign.models import load_causal_lm, load_tokenizer
        from otalign.regularizers import build_regularizer, embedding_matrix
        from otalign.rewards import build_reward

        s = settings
        rows = load_prompt_rows(s["prompts"], s["split"])
        if s["num_prompts"]:
            picked = subsample(len(rows), s["num_prompts"], np.random.default_rng(s["seed"]))
            rows = [rows[i] for i in picked]
        prompts = [row["prompt"] for row in rows]
        columns = {name: [row[name] for row in rows] for name in prompt_columns(rows, s["prompts"])}
        tokenizer = load_tokenizer(s["reference"])
        reference = load_causal_lm(s["reference"], dtype=s["model_dtype"]).eval().requires_grad_(False)
        texts = [render_prompt(p, tokenizer, use_chat_template=s["use_chat_template"]) for p in prompts]
        ids = encode_prompts(tokenizer, texts, max_prompt_length=s["max_prompt_length"])
        reward = build_reward(s["reward_fn"], s["reward_model"], policy_tokenizer=tokenizer, dtype=s["model_dtype"])
        embeddings = embedding_matrix(reference, source="input").float()
        w = {k: v for k, v in s["wasserstein"].items() if k not in ("embeddings",)}
        w["top_k"] = min(w["top_k"], embeddings.shape[0])
        ot_regularizer = build_regularizer("wasserstein", embeddings=embeddings, **w)
        params = SamplingParams(s["max_new_tokens"], s["temperature"], s["top_k"], s["top_p"])
        return cls(s, prompts, columns, texts, ids, tokenizer, reference, reward, ot_regularizer, embeddings, params)


def eval_setup(config: SweepConfig) -> EvalSetup:
    """The :class:`EvalSetup` of ``config``, built once per process and settings."""
    settings = eval_settings(config)
    key = json.dumps(settings, sort_keys=True)
    if key not in _SETUPS:
        _SETUPS.clear()
        _SETUPS[key] = EvalSetup.build(settings)
    return _SETUPS[key]


def coherence_measure(embeddings: torch.Tensor, k: int):
    """``fn(policy_logp, ref_logp) -> (n,)``: the top-``k`` candidate spread of the policy at each position (mean
    pairwise embedding distance of its ``k`` most likely next tokens), an ``extras`` measure of
    :func:`~otalign.eval.policy.evaluate_policy`."""
    from otalign.eval.analysis import candidate_spread

    def measure(policy_logp: torch.Tensor, _ref_logp: torch.Tensor) -> torch.Tensor:
        return candidate_spread(policy_logp.cpu(), embeddings, min(k, embeddings.shape[0]))

    return measure


def evaluate_model(config: SweepConfig, folder: Path, model_path: Path | None) -> dict:
    """Evaluate the model saved at ``model_path`` (None: the reference) into ``folder/eval.json``; an existing
    evaluation with the same settings is returned as it is."""
    from otalign.eval.policy import evaluate_policy
    from otalign.models import load_causal_lm

    path = folder / EVAL_FILE
    setup = eval_setup(config)
    done = read_json(path)
    if done is not None and done.get("settings") == setup.settings:
        return done
    start, cpu = time.perf_counter(), time.process_time()
    model = setup.reference
    if model_path is not None:
        model = load_causal_lm(model_path, dtype=setup.settings["model_dtype"]).eval()
    k = setup.settings["coherence_top_k"]
    extras = {"coherence": coherence_measure(setup.embeddings, k)} if k else {}
    result = evaluate_policy(
        model,
        setup.reference,
        setup.tokenizer,
        setup.texts,
        setup.ids,
        setup.reward,
        params=setup.params,
        seed=setup.settings["seed"],
        batch_size=config.eval_batch_size,
        ot_regularizer=setup.ot_regularizer,
        extras=extras,
        columns=setup.columns,
    )
    record = {
        "settings": setup.settings,
        "model": str(model_path) if model_path is not None else setup.settings["reference"],
        **({"prompts": setup.texts} if model_path is None else {}),
        "responses": result.responses,
        "scores": result.scores,
        "lengths": result.lengths,
        "kl": result.kl,
        "w": result.ot,
        **{name: values for name, values in result.extra.items()},
        "summary": result.summary(),
        "eval_s": time.perf_counter() - start,
        "eval_cpu_s": time.process_time() - cpu,
    }
    write_json_atomic(path, record)
    return record
