"""The benchmark's metrics and statistics on hand-made cases (no model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from implicit_attention.benchmark.metrics import (
    ERASER_FRACTIONS,
    FRACTIONS,
    Curve,
    auc,
    average_ranks,
    contrast,
    count_for_fraction,
    delta_auc,
    eraser,
    eraser_count,
    kept_inputs,
    localisation,
    perturbation_curve,
    perturbed_inputs,
    ranking,
    roc_auc,
)
from implicit_attention.benchmark.stats import (
    Interval,
    PairedResult,
    format_interval,
    mean_ci,
    paired_bootstrap,
    wilson_interval,
)

# ---------------------------------------------------------------------------------------------------
# a toy task: BOS, a two-token template, a 10-token review holding two "magic" tokens, a closing token

BOS, PAD, MAGIC = 1, 0, 7
#                         0    1   2   3   4  5   6   7   8  9   10  11  12  13
INPUT_IDS = torch.tensor([BOS, 50, 51, 20, 21, 7, 22, 23, 24, 7, 25, 26, 27, 52])
POSITIONS = torch.arange(3, 13)  # the review
TEMPLATE = [BOS, 50, 51, 52]
# the magic tokens (positions 5 and 9) most relevant; a tie (6, 7); the template more relevant than anything
RELEVANCE = torch.tensor([100.0, 100.0, 100.0, 0.9, 0.1, 3.0, 0.5, 0.5, -0.2, 2.0, 0.3, 0.0, 0.7, 100.0])
CONSTANT = 0.5  # label 0's logit; label 1's logit is the number of magic tokens


def p(k: int) -> float:
    """The toy scorer's probability of label 1 with ``k`` magic tokens left."""
    return 1.0 / (1.0 + math.exp(-(k - CONSTANT)))


class MagicScorer:
    """Logits ``[0.5, #magic]``; records every call's sequences."""

    def __init__(self) -> None:
        self.calls: list[list[torch.Tensor]] = []

    def __call__(self, sequences):
        self.calls.append([s.clone() for s in sequences])
        return torch.tensor([[CONSTANT, float((s == MAGIC).sum())] for s in sequences])


# ---------------------------------------------------------------------------------------------------
# ranking and counts


def test_ranking_sorts_by_relevance_with_ties_broken_by_position():
    relevance = torch.tensor([9.0, 0.5, 0.2, 0.5, 0.9, 9.0])
    for positions in (torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 2, 1]), torch.tensor([3, 1, 4, 2])):
        assert ranking(relevance, positions).tolist() == [4, 1, 3, 2]
        assert ranking(relevance, positions, descending=False).tolist() == [2, 1, 3, 4]
    assert ranking(relevance, torch.tensor([1, 2, 3, 4])).dtype == torch.long


def test_ranking_never_holds_the_template_or_bos():
    order = ranking(RELEVANCE, POSITIONS)
    assert order.tolist() == [5, 9, 3, 12, 6, 7, 10, 4, 11, 8]
    assert ranking(RELEVANCE, POSITIONS, descending=False).tolist() == [8, 11, 4, 10, 6, 7, 12, 3, 9, 5]


def test_ranking_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        ranking(torch.tensor([0.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="more than once"):
        ranking(torch.zeros(4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ranking(torch.zeros(4), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="1-D"):
        ranking(torch.zeros(1, 4), torch.tensor([1]))


def test_count_for_fraction_rounds_half_up():
    assert [count_for_fraction(10, f) for f in FRACTIONS] == list(range(11))
    assert count_for_fraction(0, 0.5) == 0
    assert [count_for_fraction(1, f) for f in (0.0, 0.4, 0.5, 1.0)] == [0, 0, 1, 1]
    assert [count_for_fraction(3, f) for f in FRACTIONS] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]  # 1.5 -> 2
    assert count_for_fraction(10, 0.35) == 4
    assert count_for_fraction(45, 0.7) == 32  # 0.7 * 45 is 31.499999999999996 in floats, still a half
    assert count_for_fraction(7, 1.0) == 7
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        count_for_fraction(10, 1.5)


def test_eraser_count_rounds_up_and_takes_at_least_one():
    assert [eraser_count(10, f) for f in ERASER_FRACTIONS] == [1, 1, 2, 5]
    assert [eraser_count(30, f) for f in ERASER_FRACTIONS] == [2, 3, 6, 15]
    assert eraser_count(10, 0.1 + 0.2) == 3  # 3.0000000000000004 in floats, still 3
    assert [eraser_count(3, f) for f in ERASER_FRACTIONS] == [1, 1, 1, 2]
    assert eraser_count(1, 0.05) == 1
    assert eraser_count(10, 1e-12) == 1
    assert eraser_count(0, 0.5) == 0


# ---------------------------------------------------------------------------------------------------
# perturbed sequences

IDS6 = torch.tensor([1, 10, 11, 12, 13, 2])


def test_perturbed_inputs_delete_and_replace_by_hand():
    order, counts = torch.tensor([3, 1, 4]), [0, 1, 2, 3]
    deleted = perturbed_inputs(IDS6, order, counts, mode="delete")
    assert [s.tolist() for s in deleted] == [[1, 10, 11, 12, 13, 2], [1, 10, 11, 13, 2], [1, 11, 13, 2], [1, 11, 2]]
    replaced = perturbed_inputs(IDS6, order, counts, mode="replace", pad_id=0)
    assert [s.tolist() for s in replaced] == [[1, 10, 11, 12, 13, 2], [1, 10, 11, 0, 13, 2], [1, 0, 11, 0, 13, 2],
                                              [1, 0, 11, 0, 0, 2]]
    assert IDS6.tolist() == [1, 10, 11, 12, 13, 2]  # untouched


def test_kept_inputs_keep_the_top_and_the_template():
    order, counts = torch.tensor([3, 1, 4, 2]), [0, 1, 2, 4]
    deleted = kept_inputs(IDS6, order, counts, mode="delete")
    assert [s.tolist() for s in deleted] == [[1, 2], [1, 12, 2], [1, 10, 12, 2], [1, 10, 11, 12, 13, 2]]
    replaced = kept_inputs(IDS6, order, counts, mode="replace", pad_id=0)
    assert [s.tolist() for s in replaced] == [[1, 0, 0, 0, 0, 2], [1, 0, 0, 12, 0, 2], [1, 10, 0, 12, 0, 2],
                                              [1, 10, 11, 12, 13, 2]]


def test_perturbed_inputs_refuse_bad_arguments():
    with pytest.raises(ValueError, match="pad_id"):
        perturbed_inputs(IDS6, torch.tensor([1]), [1], mode="replace")
    with pytest.raises(ValueError, match="mode"):
        perturbed_inputs(IDS6, torch.tensor([1]), [1], mode="mask")
    with pytest.raises(ValueError, match="count"):
        perturbed_inputs(IDS6, torch.tensor([1, 2]), [3], mode="delete")
    with pytest.raises(ValueError, match="one sequence"):
        kept_inputs(IDS6[None], torch.tensor([1]), [1], mode="delete")


# ---------------------------------------------------------------------------------------------------
# scores, curves, AUC


def test_contrast_mean_and_max_of_the_other_labels():
    scores = torch.tensor([[1.0, 2.0, 4.0], [3.0, 0.0, 1.0]])
    assert contrast(scores, 2).tolist() == [2.5, -0.5]
    assert contrast(scores, 2, other="max").tolist() == [2.0, -2.0]
    two = torch.tensor([[0.5, 2.0]])
    assert contrast(two, 1).item() == contrast(two, 1, other="max").item() == 1.5
    with pytest.raises(ValueError, match="target"):
        contrast(scores, 3)


def test_auc_constant_and_polylines():
    assert auc(FRACTIONS, [0.7] * 11) == pytest.approx(0.7)
    assert auc([0.0, 0.5, 1.0], [1.0, 0.0, 1.0]) == pytest.approx(0.5)
    assert auc([0.0, 0.2, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(0.1 + 0.8)
    assert auc(FRACTIONS, [1.0] + [0.0] * 10) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="increasing"):
        auc([0.0, 0.5, 0.5], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("mode", ["delete", "replace"])
def test_positive_curve_drops_where_the_magic_tokens_go(mode):
    scorer = MagicScorer()
    curve = perturbation_curve(scorer, INPUT_IDS, RELEVANCE, POSITIONS, 1, mode=mode, pad_id=PAD,
                               most_relevant_first=True)
    assert curve.fractions == list(FRACTIONS)
    assert curve.counts == list(range(11))
    assert curve.probability == pytest.approx([p(2), p(1)] + [p(0)] * 9)
    assert curve.score == pytest.approx([1.5, 0.5] + [-0.5] * 9)
    assert curve.correct == [True, True] + [False] * 9
    assert curve.auc() == pytest.approx(0.1 * ((p(2) + p(1)) / 2 + (p(1) + p(0)) / 2 + 8 * p(0)))
    assert curve.auc("correct") == pytest.approx(0.15)

    # one call with every step; the template is always there
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 11
    sequences = scorer.calls[0]
    assert sequences[0].tolist() == INPUT_IDS.tolist()
    if mode == "delete":
        assert [s.numel() for s in sequences] == [14 - k for k in range(11)]
        assert sequences[10].tolist() == TEMPLATE
        assert sequences[2].tolist() == [BOS, 50, 51, 20, 21, 22, 23, 24, 25, 26, 27, 52]
    else:
        assert all(s.numel() == 14 for s in sequences)
        assert sequences[10].tolist() == [BOS, 50, 51] + [PAD] * 10 + [52]
        assert sequences[1].tolist() == [BOS, 50, 51, 20, 21, PAD, 22, 23, 24, 7, 25, 26, 27, 52]


def test_negative_curve_stays_high_and_delta_auc():
    most = perturbation_curve(MagicScorer(), INPUT_IDS, RELEVANCE, POSITIONS, 1, mode="delete",
                              most_relevant_first=True)
    scorer = MagicScorer()
    least = perturbation_curve(scorer, INPUT_IDS, RELEVANCE, POSITIONS, 1, mode="delete", most_relevant_first=False)
    assert least.probability == pytest.approx([p(2)] * 9 + [p(1), p(0)])
    assert least.correct == [True] * 10 + [False]
    assert least.auc() == pytest.approx(0.1 * (8 * p(2) + (p(2) + p(1)) / 2 + (p(1) + p(0)) / 2))
    assert scorer.calls[0][9].tolist() == [BOS, 50, 51, 7, 52]  # 9 removed: the less relevant magic token goes
    assert delta_auc(least, most) == pytest.approx(0.8 * (p(2) - p(0)))
    assert delta_auc(least, most, key="correct") == pytest.approx(0.95 - 0.15)
    assert delta_auc(least, most, key="score") == pytest.approx(0.8 * 2.0)
    with pytest.raises(ValueError, match="least-relevant-first"):
        delta_auc(most, least)


def test_curve_follows_the_ranking_not_the_positions():
    # the magic tokens ranked 1st and 3rd: the probability drops at 10% and 30%
    relevance = RELEVANCE.clone()
    relevance[9] = 0.8  # below position 3 (0.9)
    curve = perturbation_curve(MagicScorer(), INPUT_IDS, relevance, POSITIONS, 1, mode="delete",
                               most_relevant_first=True)
    assert curve.probability == pytest.approx([p(2), p(1), p(1)] + [p(0)] * 8)
    # target 0: the probability of label 0 is 1 - p(k), its contrast 0.5 - k
    curve0 = perturbation_curve(MagicScorer(), INPUT_IDS, relevance, POSITIONS, 0, mode="delete",
                                most_relevant_first=True)
    assert curve0.probability == pytest.approx([1 - p(2), 1 - p(1), 1 - p(1)] + [1 - p(0)] * 8)
    assert curve0.score == pytest.approx([-1.5, -0.5, -0.5] + [0.5] * 8)


def test_constant_relevance_removes_the_same_tokens_in_both_orders():
    flat = torch.zeros(14)
    most = perturbation_curve(MagicScorer(), INPUT_IDS, flat, POSITIONS, 1, mode="delete", most_relevant_first=True)
    least = perturbation_curve(MagicScorer(), INPUT_IDS, flat, POSITIONS, 1, mode="delete", most_relevant_first=False)
    assert most.probability == least.probability
    assert delta_auc(least, most) == 0.0


def test_curve_round_trips_through_json():
    curve = perturbation_curve(MagicScorer(), INPUT_IDS, RELEVANCE, POSITIONS, 1, mode="replace", pad_id=PAD,
                               most_relevant_first=False)
    data = json.loads(json.dumps(curve.to_dict()))
    assert Curve.from_dict(data) == curve
    assert isinstance(data["correct"][0], bool) and isinstance(data["probability"][0], float)


def test_curve_refuses_bad_scorer_output_and_empty_candidates():
    with pytest.raises(ValueError, match=r"\[11, num_labels\]"):
        perturbation_curve(lambda seqs: torch.zeros(3, 2), INPUT_IDS, RELEVANCE, POSITIONS, 1, mode="delete",
                           most_relevant_first=True)
    with pytest.raises(ValueError, match="no candidate"):
        perturbation_curve(MagicScorer(), INPUT_IDS, RELEVANCE, torch.tensor([], dtype=torch.long), 1, mode="delete",
                           most_relevant_first=True)
    with pytest.raises(ValueError, match="relevance has 13 values"):
        perturbation_curve(MagicScorer(), INPUT_IDS, RELEVANCE[:13], POSITIONS, 1, mode="delete",
                           most_relevant_first=True)


# ---------------------------------------------------------------------------------------------------
# ERASER


@pytest.mark.parametrize("mode", ["delete", "replace"])
def test_eraser_by_hand(mode):
    scorer = MagicScorer()
    result = eraser(scorer, INPUT_IDS, RELEVANCE, POSITIONS, 1, mode=mode, pad_id=PAD)
    assert result["fractions"] == list(ERASER_FRACTIONS)
    assert result["counts"] == [1, 1, 2, 5]
    assert result["probability"] == pytest.approx(p(2))
    comprehensiveness = [p(2) - p(1), p(2) - p(1), p(2) - p(0), p(2) - p(0)]
    sufficiency = [p(2) - p(1), p(2) - p(1), 0.0, 0.0]
    assert result["comprehensiveness"] == pytest.approx(comprehensiveness)
    assert result["sufficiency"] == pytest.approx(sufficiency, abs=1e-12)
    assert result["comprehensiveness_mean"] == pytest.approx(np.mean(comprehensiveness))
    assert result["sufficiency_mean"] == pytest.approx(np.mean(sufficiency))
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 9
    kept_two = scorer.calls[0][7]  # the full input, 4 without r, then r of 5%, 10%, 20%, 50%
    if mode == "delete":
        assert kept_two.tolist() == [BOS, 50, 51, 7, 7, 52]
    else:
        assert kept_two.tolist() == [BOS, 50, 51, PAD, PAD, 7, PAD, PAD, PAD, 7, PAD, PAD, PAD, 52]
    json.dumps(result)


# ---------------------------------------------------------------------------------------------------
# localisation


def test_localisation_perfect_and_reversed():
    planted = torch.tensor([5, 9])
    assert localisation(RELEVANCE, POSITIONS, planted) == {"roc_auc": 1.0, "pointing": 1.0}
    reversed_relevance = -RELEVANCE  # the template now least relevant: still not a candidate
    assert localisation(reversed_relevance, POSITIONS, planted) == {"roc_auc": 0.0, "pointing": 0.0}


def test_localisation_with_ties_by_hand():
    # candidates 1..4: planted 1 and 2 (relevance 1, 1), others 3 and 4 (1, 0); BOS most relevant but no candidate
    relevance = torch.tensor([5.0, 1.0, 1.0, 1.0, 0.0])
    result = localisation(relevance, torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2]))
    # pairs (planted, other): (1,1) 1/2, (1,0) 1, (1,1) 1/2, (1,0) 1 -> 3/4; top tie: 2 of 3 planted
    assert result["roc_auc"] == pytest.approx(0.75)
    assert result["pointing"] == pytest.approx(2 / 3)


def test_roc_auc_matches_a_pairwise_count():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        scores = rng.integers(0, 5, size=n).astype(float)  # many ties
        labels = rng.random(n) < 0.3
        labels[0], labels[1] = True, False
        positives, negatives = scores[labels], scores[~labels]
        diff = positives[:, None] - negatives[None, :]
        expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
        assert roc_auc(scores, labels) == pytest.approx(expected)


def test_average_ranks():
    assert average_ranks(np.array([10.0, 30.0, 20.0, 30.0, 10.0])).tolist() == [1.5, 4.5, 3.0, 4.5, 1.5]


def test_localisation_refuses_degenerate_ground_truth():
    with pytest.raises(ValueError, match="at least one planted"):
        localisation(RELEVANCE, POSITIONS, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="not planted"):
        localisation(RELEVANCE, POSITIONS, POSITIONS)
    with pytest.raises(ValueError, match="candidate"):
        localisation(RELEVANCE, POSITIONS, torch.tensor([0, 5]))


# ---------------------------------------------------------------------------------------------------
# statistics


def test_mean_ci_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = mean_ci(rng.normal(size=20))
    large = mean_ci(rng.normal(size=400))
    for interval in (small, large):
        assert interval.low < interval.mean < interval.high
    assert large.n == 400
    assert large.high - large.low < small.high - small.low
    # about 2 * 1.96 * sd / sqrt(n) for a normal sample
    assert large.high - large.low == pytest.approx(2 * 1.96 / 20, rel=0.15)


def test_mean_ci_is_deterministic_and_degenerate_for_a_constant():
    values = np.random.default_rng(2).random(30)
    assert mean_ci(values, seed=3) == mean_ci(values, seed=3)
    assert mean_ci(values, seed=3) != mean_ci(values, seed=4)
    assert mean_ci([0.1] * 7) == Interval(mean=0.1, low=0.1, high=0.1, n=7)
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])


def test_paired_bootstrap():
    rng = np.random.default_rng(5)
    a = rng.normal(size=50)
    same = paired_bootstrap(a, a.copy())
    assert same == PairedResult(difference=0.0, low=0.0, high=0.0, p_value=1.0, n=50)
    symmetric = paired_bootstrap(np.tile([1.0, -1.0], 25), np.zeros(50))
    assert symmetric.difference == 0.0 and symmetric.p_value > 0.9
    shifted = paired_bootstrap(a, a - 1 + 0.1 * rng.normal(size=50))
    assert shifted.p_value == pytest.approx(1 / 10_001)  # no random sign pattern reaches the observed shift
    assert shifted.p_value < 0.01
    # small n: the exact sign-flip test, by hand. d = [1, 2]: |means| 1.5, 0.5, 0.5, 1.5 -> p = 2/4
    assert paired_bootstrap(np.array([1.0, 2.0]), np.zeros(2)).p_value == pytest.approx(0.5)
    # d = [1, 1, 1]: only all-plus and all-minus reach |mean| 1 -> p = 2/8
    assert paired_bootstrap(np.ones(3), np.zeros(3)).p_value == pytest.approx(0.25)
    assert shifted.low < shifted.difference < shifted.high
    assert 0.9 < shifted.low and shifted.high < 1.1
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap(a, a[:-1])


def test_wilson_interval_by_hand():
    z = 1.959963984540054

    def wilson(k: int, n: int) -> tuple[float, float]:
        q = k / n
        centre = (q + z**2 / (2 * n)) / (1 + z**2 / n)
        half = z / (1 + z**2 / n) * math.sqrt(q * (1 - q) / n + z**2 / (4 * n**2))
        return centre - half, centre + half

    for k, published in ((0, (0.0, 0.2775)), (10, (0.7225, 1.0)), (5, (0.2366, 0.7634))):
        interval = wilson_interval(k, 10)
        assert interval.mean == k / 10 and interval.n == 10
        assert (interval.low, interval.high) == pytest.approx(wilson(k, 10), abs=1e-12)
        assert (interval.low, interval.high) == pytest.approx(published, abs=1e-4)
    assert wilson_interval(0, 10).low == 0.0 and wilson_interval(10, 10).high == 1.0
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_format_interval():
    assert format_interval(Interval(mean=0.173, low=0.161, high=0.185, n=10), scale=100) == "17.3 [16.1, 18.5]"
    assert format_interval(PairedResult(difference=-0.5, low=-1.25, high=0.25, p_value=0.3, n=4),
                           digits=2) == "-0.50 [-1.25, 0.25]"
