"""otalign's RLOOTrainer (``loss_type: sequence``, its default) against TRL 1.16's RLOOTrainer run on the same
completions: TRL's sequence-level objective, the first-order KL in the reward, leave-one-out advantages and
``normalize_advantages``; advantages, micro-batch losses, gradients and learning rates equal to 1e-5 relative."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from cases import RLOO_CASES  # noqa: E402
from critic_free import Settings, compare, run_otalign, run_trl  # noqa: E402
from parity import params  # noqa: E402


@pytest.mark.parametrize("case", params(RLOO_CASES))
def test_rloo_equals_trl(tmp_path, case):
    settings = Settings(**case.settings)
    ours, rollouts, groups, micro_batches = run_otalign(tmp_path / "ours", settings)
    theirs = run_trl(tmp_path / "theirs", settings, rollouts, groups, micro_batches)
    # TRL's RLOO returns the micro-batch's mean (transformers divides it by the accumulation steps)
    compare(ours, theirs, loss_scale=1 / settings.gradient_accumulation_steps)
