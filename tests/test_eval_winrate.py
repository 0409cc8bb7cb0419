"""Win-rate arithmetic: ties count half, malformed verdicts are counted but not scored, the answer order is
randomised per comparison (seeded) and mapped back, repeats are summarised as mean ± sample std."""

from __future__ import annotations

import math

import numpy as np
import pytest

from otalign.eval import Comparison, Judge, Judgement, WinRate, compare, mean_std, subsample


class AlwaysFirst(Judge):
    """A maximally position-biased judge: always says A."""

    def judge(self, prompts, first, second):
        return [Judgement("A", "A") for _ in prompts]


class PrefersGood(Judge):
    """Prefers the answer containing "good", ties when both or neither do."""

    def judge(self, prompts, first, second):
        out = []
        for a, b in zip(first, second, strict=True):
            ga, gb = "good" in a, "good" in b
            out.append(Judgement("E" if ga == gb else ("A" if ga else "B"), ""))
        return out


@pytest.mark.parametrize(
    ("swapped", "verdict", "score"),
    [(False, "A", 1.0), (False, "B", 0.0), (False, "E", 0.5), (True, "A", 0.0), (True, "B", 1.0), (True, "E", 0.5)],
)
def test_comparison_maps_verdict_back_to_x(swapped, verdict, score):
    assert Comparison(0, swapped, verdict, "").score == score


def test_malformed_verdict_has_no_score():
    assert Comparison(0, True, None, "I cannot decide").score is None


def test_win_rate_hand_case_ties_half_malformed_excluded():
    verdicts = [("A", False)] * 3 + [("E", True), ("E", False)] + [("A", True)] + [(None, False)]
    rate = WinRate.of([Comparison(i, s, v, "") for i, (v, s) in enumerate(verdicts)])
    assert (rate.wins, rate.ties, rate.losses, rate.malformed) == (3, 2, 1, 1)
    assert rate.rate == pytest.approx((3 + 0.5 * 2) / 6)
    assert rate.to_dict()["win_rate"] == rate.rate


def test_all_ties_is_one_half_and_all_malformed_is_nan():
    assert WinRate(0, 4, 0, 0).rate == 0.5
    assert math.isnan(WinRate(0, 0, 0, 3).rate)


def test_order_is_randomised_seeded_and_mapped_back():
    n = 400
    prompts, xs, ys = ["p"] * n, ["good answer"] * n, ["bad answer"] * n
    first = compare(PrefersGood(), prompts, xs, ys, np.random.default_rng(7))
    again = compare(PrefersGood(), prompts, xs, ys, np.random.default_rng(7))
    swaps = [c.swapped for c in first]
    assert swaps == [c.swapped for c in again]  # seeded
    assert abs(sum(swaps) - n / 2) < 4 * math.sqrt(n / 4)  # a fair coin per comparison
    assert WinRate.of(first).rate == 1.0  # the better answer wins in either position
    assert WinRate.of(compare(PrefersGood(), prompts, ys, xs, np.random.default_rng(7))).rate == 0.0


def test_position_bias_cancels_out_to_the_share_of_unswapped_comparisons():
    n = 400
    comparisons = compare(AlwaysFirst(), ["p"] * n, ["x"] * n, ["y"] * n, np.random.default_rng(3))
    unswapped = sum(not c.swapped for c in comparisons)
    assert WinRate.of(comparisons).rate == unswapped / n
    assert abs(WinRate.of(comparisons).rate - 0.5) < 0.1


def test_compare_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="differ in length"):
        compare(AlwaysFirst(), ["p", "q"], ["x"], ["y", "z"], np.random.default_rng(0))


def test_mean_std_uses_sample_std():
    mean, std = mean_std([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6)
    assert std == pytest.approx(0.1)
    assert mean_std([0.4]) == (0.4, 0.0)


def test_subsample_is_distinct_sorted_and_capped():
    rng = np.random.default_rng(0)
    picked = subsample(100, 50, rng)
    assert len(picked) == len(set(picked)) == 50 and picked == sorted(picked)
    assert subsample(5, 50, rng) == [0, 1, 2, 3, 4]
