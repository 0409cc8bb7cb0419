"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op thread (restored afterwards).

    Tiny tensor ops are far slower multi-threaded on a busy few-core machine; use it with
    ``pytestmark = pytest.mark.usefixtures("torch_single_thread")`` in modules of small-tensor tests.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def two_process_cli():
    """``run(args, check=True)``: ``otalign <args>`` launched as the README's DDP command on CPU,
    ``ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2
    --mixed_precision no -m otalign.cli <args>`` (2 processes, gloo); with ``check`` the test fails with the
    launch's stderr if it does. Returns the ``subprocess.CompletedProcess`` (text output captured)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).parents[1] / "examples" / "accelerate" / "ddp.yaml"

    def run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        command += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", port]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [*command, "-m", "otalign.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0 or not check, done.stderr[-3000:]
        return done

    return run


@pytest.fixture
def assert_resume_matches():
    """``check(full_dir, resumed_dir, resumed_steps)``: the resumed run logged exactly ``resumed_steps`` and every
    non-timing metric of those steps equals the uninterrupted run's."""
    from otalign.trainers import read_metrics

    def check(full_dir, resumed_dir, resumed_steps):
        full = [row for row in read_metrics(full_dir) if row["step"] in resumed_steps]
        resumed = read_metrics(resumed_dir)
        assert [row["step"] for row in resumed] == list(resumed_steps)
        for row_full, row_resumed in zip(full, resumed, strict=True):
            for key in row_full:
                if not key.startswith("time/"):
                    assert row_full[key] == row_resumed[key], key

    return check


@pytest.fixture
def trainer_factory():
    """``factory(trainer_cls, config_cls, *, inputs=None, **defaults)`` -> ``make``, where
    ``make(output_dir, *, tokenizer=None, model_seed=0, **overrides)`` builds ``trainer_cls`` on tiny random models
    (:mod:`otalign.models.tiny`) writing to ``output_dir``, without progress bar or saved model unless overridden.

    ``defaults`` then ``overrides`` set the fields of ``config_cls``; the other overrides, on top of ``inputs``, are
    keyword arguments of the trainer (``train_data``, ``model``, ...). The trainer gets the tokenizer (default: the
    tiny one) and, unless given, a tiny model seeded ``model_seed`` as ``policy`` (with a ``ref_model`` seeded 0 when
    it takes one) or as ``model``."""
    import dataclasses
    import inspect

    from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer

    def factory(trainer_cls, config_cls, *, inputs: dict | None = None, **defaults):
        fields = {f.name for f in dataclasses.fields(config_cls)}
        takes = inspect.signature(trainer_cls).parameters

        def make(output_dir, *, tokenizer=None, model_seed: int = 0, **overrides):
            tokenizer = tokenizer or tiny_tokenizer()
            settings = {"output_dir": str(output_dir), "progress_bar": False, "save_model": False, **defaults}
            kwargs = {"tokenizer": tokenizer, **(inputs or {})}
            for name, value in overrides.items():
                (settings if name in fields else kwargs)[name] = value
            model = "policy" if "policy" in takes else "model"
            if kwargs.get(model) is None:
                kwargs[model] = tiny_causal_lm(tokenizer, seed=model_seed)
            if "ref_model" in takes and kwargs.get("ref_model") is None:
                kwargs["ref_model"] = tiny_causal_lm(tokenizer, seed=0)
            return trainer_cls(config_cls(**settings), **kwargs)

        return make

    return factory
