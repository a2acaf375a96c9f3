"""Paired statistics: McNemar's exact test, the paired / cluster bootstrap, compare_paired (numpy only)."""

import json
import math

import numpy as np
import pytest

from img_guidance.eval.stats import (
    PairedComparison,
    _binomial_half_tail_exact,
    _binomial_half_tail_log,
    compare_paired,
    mcnemar_exact,
    paired_bootstrap,
)


def _normal_p(b: int, c: int) -> float:
    """Two-sided p of McNemar's normal approximation with continuity correction:
    z = (|b - c| - 1) / sqrt(b + c), p = erfc(z / sqrt 2)."""
    z = (abs(b - c) - 1) / math.sqrt(b + c)
    return math.erfc(z / math.sqrt(2))


class TestMcNemar:
    def test_all_discordant_pairs_one_way(self):
        """b=0, c=5: P(X <= 0) = 0.5**5, p = 2 * 0.5**5 = 0.0625."""
        assert mcnemar_exact(0, 5) == 0.0625

    def test_one_against_nine(self):
        """b=1, c=9: P(X <= 1) = (C(10,0) + C(10,1)) / 2**10 = 11 / 1024, p = 22 / 1024 = 0.021484375."""
        assert mcnemar_exact(1, 9) == 0.021484375

    def test_two_against_six(self):
        """b=2, c=6: P(X <= 2) = (1 + 8 + 28) / 256 = 37 / 256, p = 74 / 256 = 0.2890625."""
        assert mcnemar_exact(2, 6) == 0.2890625

    @pytest.mark.parametrize("b, c", [(3, 3), (4, 5), (1, 0), (250, 250)])
    def test_balanced_counts_are_capped_at_one(self, b, c):
        """b=c=3: P(X <= 3) = (1 + 6 + 15 + 20) / 64 = 42 / 64, 2 * 42 / 64 > 1 -> 1.0; b and c one
        apart (n odd): P(X <= (n-1)/2) = 1/2 exactly -> 1.0."""
        assert mcnemar_exact(b, c) == 1.0

    def test_no_discordant_pairs(self):
        """b=c=0: no evidence either way -> 1.0."""
        assert mcnemar_exact(0, 0) == 1.0

    @pytest.mark.parametrize("b, c", [(0, 5), (1, 9), (7, 19), (2000, 2100), (30_000, 31_000)])
    def test_symmetric(self, b, c):
        assert mcnemar_exact(b, c) == mcnemar_exact(c, b)

    def test_large_n_matches_normal_approximation(self):
        """b=2000, c=2100: z = 99 / sqrt(4100) = 1.546, normal p = 0.1221; the exact p is finite, in
        (0, 1) and agrees to 2 decimals."""
        p = mcnemar_exact(2000, 2100)
        assert math.isfinite(p) and 0.0 < p < 1.0
        assert p == pytest.approx(_normal_p(2000, 2100), abs=5e-3)

    def test_log_space_path_beyond_the_exact_limit(self):
        """n = 100,000 takes the log-space sum: still close to the normal approximation
        (z = 1999 / sqrt(1e5) = 6.32, p ~ 2.6e-10) and far from 0 or 1."""
        p = mcnemar_exact(49_000, 51_000)
        assert 0.0 < p < 1e-8
        assert p == pytest.approx(_normal_p(49_000, 51_000), rel=0.05)

    @pytest.mark.parametrize("k, n", [(0, 5), (1, 10), (37, 100), (2000, 4100), (3, 1500)])
    def test_log_space_tail_agrees_with_exact_sum(self, k, n):
        assert _binomial_half_tail_log(k, n) == pytest.approx(_binomial_half_tail_exact(k, n), rel=1e-9)

    def test_smaller_when_more_lopsided(self):
        assert mcnemar_exact(10, 30) < mcnemar_exact(15, 25) < mcnemar_exact(19, 21)

    @pytest.mark.parametrize("b, c", [(-1, 3), (2, -4)])
    def test_negative_counts_are_named(self, b, c):
        with pytest.raises(ValueError, match=f"b={b}, c={c}"):
            mcnemar_exact(b, c)

    def test_non_integer_counts_are_named(self):
        with pytest.raises(TypeError, match=r"b=1\.5"):
            mcnemar_exact(1.5, 3)

    def test_numpy_integers_are_counts(self):
        assert mcnemar_exact(np.int64(1), np.int32(9)) == 0.021484375


class TestPairedBootstrap:
    def test_identical_systems(self):
        a = [True, False, True, True, False, False, True]
        assert paired_bootstrap(a, list(a), resamples=500) == (0.0, 0.0)

    def test_strictly_better_system_excludes_zero(self):
        """A is right on every image B is right on, and on 30 of 100 more: the difference is 0.3 and
        every resample's difference is >= 0, so the interval sits above 0 around 0.3."""
        b = [i < 50 for i in range(100)]
        a = [i < 80 for i in range(100)]
        low, high = paired_bootstrap(a, b, resamples=2000)
        assert 0.0 < low < 0.3 < high < 0.5

    def test_worse_system_has_negative_interval(self):
        b = [i < 80 for i in range(100)]
        a = [i < 50 for i in range(100)]
        low, high = paired_bootstrap(a, b, resamples=2000)
        assert -0.5 < low < -0.3 < high < 0.0

    def test_deterministic_in_seed(self):
        rng = np.random.default_rng(1)
        a, b = list(rng.random(300) < 0.6), list(rng.random(300) < 0.5)
        first = paired_bootstrap(a, b, resamples=1000, seed=7)
        assert paired_bootstrap(a, b, resamples=1000, seed=7) == first
        assert paired_bootstrap(a, b, resamples=1000, seed=8) != first

    def test_groups_are_resampled_whole(self):
        """20 prompts with 2 seeds each, in every prompt A alone right on seed 0 and both wrong on
        seed 1: every prompt's mean difference is 1/2, so any resample of whole prompts gives exactly
        0.5, while resampling single images spreads around 0.5 (sd sqrt(0.25 / 40) = 0.079)."""
        a = [True, False] * 20
        b = [False, False] * 20
        groups = [i // 2 for i in range(40)]
        assert paired_bootstrap(a, b, resamples=1000, groups=groups) == (0.5, 0.5)
        low, high = paired_bootstrap(a, b, resamples=1000)
        assert high - low > 0.2

    def test_correlated_groups_widen_the_interval(self):
        """20 prompts of 5 seeds, each prompt all one way (A alone right on 12, both right on 8): the
        images of a prompt are not independent. Item sd sqrt(0.24 / 100) = 0.049, group sd
        sqrt(0.24 / 20) = 0.110: the cluster interval is about sqrt(5) = 2.2 times wider."""
        a = [True] * 100
        b = [p >= 12 for p in range(20) for _ in range(5)]
        groups = [p for p in range(20) for _ in range(5)]
        item_low, item_high = paired_bootstrap(a, b, resamples=4000)
        group_low, group_high = paired_bootstrap(a, b, resamples=4000, groups=groups)
        assert group_high - group_low > 1.5 * (item_high - item_low)
        assert group_low < 0.6 < group_high and item_low < 0.6 < item_high

    def test_any_hashable_group_keys(self):
        a = [True, False, True, True]
        b = [False, False, True, False]
        by_int = paired_bootstrap(a, b, resamples=300, groups=[0, 0, 1, 1])
        by_prompt = paired_bootstrap(a, b, resamples=300, groups=["red", "red", ("blue", 2), ("blue", 2)])
        assert by_int == by_prompt

    def test_length_mismatch_names_both_lengths(self):
        with pytest.raises(ValueError, match="a has 3 outcomes but b has 2"):
            paired_bootstrap([True, False, True], [True, False])

    def test_groups_length_is_checked(self):
        with pytest.raises(ValueError, match="groups has 2 keys but there are 3 pairs"):
            paired_bootstrap([True] * 3, [False] * 3, groups=[0, 1])

    def test_none_is_refused(self):
        with pytest.raises(ValueError, match=r"b\[1\] is None"):
            paired_bootstrap([True, True], [True, None])

    @pytest.mark.parametrize("resamples", [0, -5, 2.5])
    def test_bad_resamples_are_named(self, resamples):
        with pytest.raises(ValueError, match=f"got {resamples}"):
            paired_bootstrap([True], [False], resamples=resamples)


class TestComparePaired:
    def test_hand_computed(self):
        """a = [T, T, None, F, T] -> [T, T, F, F, T]: 3/5 = 0.6; b = [F, T, T, None, None] ->
        [F, T, T, F, F]: 2/5 = 0.4. Only A right on images 0 and 4 (b=2), only B on image 2 (c=1):
        difference (2 - 1) / 5 = 0.2, p = 2 * P(X <= 1 | n=3) = 2 * 4/8 = 1.0."""
        result = compare_paired(
            [True, True, None, False, True], [False, True, True, None, None], resamples=500
        )
        assert (result.n, result.only_a, result.only_b) == (5, 2, 1)
        assert result.accuracy_a == pytest.approx(0.6)
        assert result.accuracy_b == pytest.approx(0.4)
        assert result.difference == pytest.approx(0.2)
        assert result.p_value == 1.0 and result.significant is False
        low, high = result.ci95
        assert low <= result.difference <= high

    def test_significant_difference(self):
        """Only A right on 9 images, only B on 1, both right on 10: p = 0.021484375 < 0.05."""
        a = [True] * 9 + [False] + [True] * 10
        b = [False] * 9 + [True] + [True] * 10
        result = compare_paired(a, b, resamples=1000)
        assert (result.only_a, result.only_b) == (9, 1)
        assert result.p_value == 0.021484375
        assert result.significant is True
        assert result.difference == pytest.approx(0.4)

    def test_undecided_counts_as_not_correct(self):
        """None against False is a concordant pair: no discordant pairs, p = 1, difference 0."""
        result = compare_paired([None, None, True], [False, False, True], resamples=200)
        assert (result.only_a, result.only_b, result.difference, result.p_value) == (0, 0, 0.0, 1.0)

    def test_groups_reach_the_bootstrap(self):
        a = [True, False] * 20
        b = [False, False] * 20
        result = compare_paired(a, b, groups=[i // 2 for i in range(40)], resamples=300)
        assert result.ci95 == (0.5, 0.5)

    def test_to_dict_is_json_ready(self):
        result = compare_paired([True, False, True], [False, False, True], resamples=200)
        data = json.loads(json.dumps(result.to_dict()))
        assert set(data) == {f.name for f in PairedComparison.__dataclass_fields__.values()}
        assert data["ci95"] == list(result.ci95)
        assert data["only_a"] == 1 and data["n"] == 3

    def test_frozen(self):
        result = compare_paired([True], [False], resamples=10)
        with pytest.raises(AttributeError):
            result.p_value = 0.0

    def test_length_mismatch_names_both_lengths(self):
        with pytest.raises(ValueError, match="a has 3 outcomes but b has 2"):
            compare_paired([True, None, False], [True, False])

    def test_empty(self):
        with pytest.raises(ValueError, match="empty"):
            compare_paired([], [])

    def test_non_outcome_value_is_named(self):
        with pytest.raises(ValueError, match=r"a\[1\] is 'yes'"):
            compare_paired([True, "yes"], [True, False])
