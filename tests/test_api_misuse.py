"""Misuse of the Python API of otalign.ot, otalign.losses and otalign.regularizers: one ValueError naming the
parameter, never an internal error, a silent NaN or a value with no meaning."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from otalign.losses import dpo_loss, kto_loss
from otalign.ot import sinkhorn, unbalanced_sinkhorn
from otalign.regularizers import FDivergenceRegularizer, WassersteinRegularizer

A = torch.full((3,), 1 / 3)
COST = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"check_every": 0}, r"check_every must be an integer >= 1, got 0"),
        ({"check_every": 2.5}, r"check_every must be an integer >= 1, got 2.5"),
        ({"max_iter": 0}, r"max_iter must be an integer >= 1, got 0"),
        ({"tol": -1}, r"tol must be finite and >= 0, got -1"),
        ({"tol": math.nan}, r"tol must be finite and >= 0"),
    ],
)
@pytest.mark.parametrize("solver", [sinkhorn, functools.partial(unbalanced_sinkhorn, rho=1.0)])
def test_iteration_settings_are_checked(solver, kwargs, message):
    with pytest.raises(ValueError, match=message):
        solver(A, A, COST, eps=0.1, **kwargs)


def test_a_negative_per_problem_tolerance_is_refused():
    with pytest.raises(ValueError, match=r"tol must be finite and >= 0"):
        sinkhorn(A.expand(2, 3), A.expand(2, 3), COST.expand(2, 3, 3), eps=0.1, tol=torch.tensor([1e-6, -1.0]))


def test_a_batch_of_no_problems_is_refused():
    with pytest.raises(ValueError, match=r"empty batch: a \(0, 3\), b \(0, 3\)"):
        sinkhorn(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3, 3), eps=0.1)


def test_a_balanced_problem_with_every_pair_forbidden_has_no_plan():
    with pytest.raises(ValueError, match=r"cost is \+inf for every pair of a\[0, 0\].*no transport plan"):
        sinkhorn(A, A, torch.full((3, 3), math.inf), eps=0.1)
    column = COST.clone()
    column[:, 2] = math.inf  # b's atom 2 has mass and no finite cost
    with pytest.raises(ValueError, match=r"every pair of b\[0, 2\]"):
        sinkhorn(A, A, column, eps=0.1)
    feasible = COST.clone()
    feasible[0, 2] = feasible[2, 0] = math.inf
    assert math.isfinite(float(sinkhorn(A, A, feasible, eps=0.1).value))  # some +inf, a plan exists: solved
    # unbalanced transport has a plan (destroy all mass): no error, a finite value
    assert math.isfinite(float(unbalanced_sinkhorn(A, A, torch.full((3, 3), math.inf), eps=0.1, rho=1.0).value))


def _pairs(n: int) -> list[torch.Tensor]:
    return [torch.randn(n, dtype=torch.float64) for _ in range(4)]


def test_dpo_sigmoid_refuses_label_smoothing_as_the_command_line_does():
    from otalign.config import ConfigError
    from otalign.trainers import PreferenceConfig

    with pytest.raises(ValueError, match=r"label_smoothing applies to kind 'robust' only.*kind='sigmoid'"):
        dpo_loss(*_pairs(3), beta=0.1, kind="sigmoid", label_smoothing=0.3)
    with pytest.raises(ConfigError, match="label_smoothing does not apply to loss_type 'sigmoid'"):
        PreferenceConfig(loss_type="sigmoid", label_smoothing=0.3)
    dpo_loss(*_pairs(3), beta=0.1, kind="robust", label_smoothing=0.3)  # where both accept it


def test_losses_refuse_an_empty_batch():
    with pytest.raises(ValueError, match=r"policy_chosen_logps, .*: empty batch"):
        dpo_loss(*_pairs(0), beta=0.1)
    empty = torch.zeros(0)
    with pytest.raises(ValueError, match=r"policy_logps, ref_logps: empty batch"):
        kto_loss(empty, empty, torch.zeros(0, dtype=torch.bool), beta=0.1)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((4, 1), r"policy_kl_logps must be 1-D"), ((0,), r"policy_kl_logps, ref_kl_logps: empty batch")],
)
def test_kto_refuses_kl_log_probs_of_the_wrong_shape(shape, message):
    logps = torch.randn(4)
    desirable = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match=message):
        kto_loss(logps, logps, desirable, beta=0.1, policy_kl_logps=torch.randn(shape), ref_kl_logps=torch.randn(shape))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("which", ["policy_logits", "ref_logits"])
@pytest.mark.parametrize("make", [lambda e: WassersteinRegularizer(e, top_k=4), lambda e: FDivergenceRegularizer("kl")])
def test_a_penalty_of_nonfinite_logits_is_refused_naming_the_position(make, which, bad):
    embeddings = torch.randn(10, 4)
    logits = {"policy_logits": torch.randn(2, 3, 10), "ref_logits": torch.randn(2, 3, 10)}
    logits[which][1, 2, 5] = bad
    actions = torch.zeros(2, 3, dtype=torch.long)
    what = "NaN" if math.isnan(bad) else r"\+inf"
    with pytest.raises(ValueError, match=rf"^{which}\[1, 2\] has {what} logits"):
        make(embeddings).penalty(logits["policy_logits"], logits["ref_logits"], actions)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False  # a position outside the mask is not scored
    out = make(embeddings).penalty(logits["policy_logits"], logits["ref_logits"], actions, mask)
    assert bool(torch.isfinite(out.per_token).all())


def test_nan_embeddings_are_refused_naming_the_row():
    embeddings = torch.randn(10, 4)
    embeddings[7, 1] = math.nan
    with pytest.raises(ValueError, match=r"^embeddings row 7 \(token id 7\) has NaN or inf entries"):
        WassersteinRegularizer(embeddings, top_k=4)


def test_a_wasserstein_regularizer_built_from_a_config_names_the_config_fields():
    from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
    from otalign.regularizers import regularizer_from_config
    from otalign.trainers import PPOConfig

    model = tiny_causal_lm(tiny_tokenizer())
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"^wpr_top_k must be an integer in \[1, V\] = \[1, {vocab}\], got 128$"):
        regularizer_from_config(PPOConfig(regularizer="wasserstein"), model)
    with pytest.raises(ValueError, match=r"^wpr_knn "):
        regularizer_from_config(PPOConfig(regularizer="wasserstein", wpr_top_k=8, wpr_knn=vocab), model)


@pytest.mark.parametrize("transport", ["full", "smooth"])
def test_the_ot_value_warning_names_newton_steps_only_where_the_transport_runs_them(transport):
    from otalign.eval.policy import ot_values
    from otalign.guard import ConvergenceWarning

    torch.manual_seed(0)
    reg = WassersteinRegularizer(
        torch.randn(10, 4), top_k=6, transport=transport, max_iter=1, tol=1e-12, newton_steps=0
    )
    logits = 5 * torch.randn(3, 10)
    with pytest.warns(ConvergenceWarning, match=r"Sinkhorn stopped at max_iter=1") as caught:
        ot_values(reg, logits, logits.roll(1, -1), torch.zeros(3, dtype=torch.long))
    assert ("newton_steps" in str(caught[0].message)) == (transport != "full")
