"""The manifold-class report's arithmetic on hand-made histograms, and its refusals."""

from __future__ import annotations

import math

import pytest
import torch

from qmm_plugin.paper.manifold_classes import (
    class_histogram,
    manifold_class_report,
    mean_pairwise_distance,
    normalized_mutual_information,
    sample_manifold_class_report,
)


def one_hot_probs(labels: list[int], k: int, p: float = 1.0) -> torch.Tensor:
    probs = torch.full((len(labels), k), (1 - p) / (k - 1))
    probs[torch.arange(len(labels)), torch.tensor(labels)] = p
    return probs


def test_histogram_counts_pairs() -> None:
    hist = class_histogram(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([2, 2, 0, 1, 1]), 2, 3)
    assert hist.tolist() == [[0, 0, 2], [1, 2, 0]]


def test_nmi_bijection_is_one_and_independence_is_zero() -> None:
    assert normalized_mutual_information(torch.eye(4) * 7) == pytest.approx(1.0)
    assert normalized_mutual_information(torch.ones(3, 5)) == pytest.approx(0.0, abs=1e-12)
    # a permutation of classes is still a bijection
    assert normalized_mutual_information(torch.eye(3)[[2, 0, 1]] * 5) == pytest.approx(1.0)


def test_nmi_hand_computed_two_by_two() -> None:
    # joint p = [[1/2, 0], [1/4, 1/4]]: H(M) = ln 2, H(K) = H(3/4, 1/4), H(M,K) = H(1/2, 1/4, 1/4)
    h_m = math.log(2)
    h_k = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h_mk = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    expected = (h_m + h_k - h_mk) / (0.5 * (h_m + h_k))
    assert normalized_mutual_information(torch.tensor([[2, 0], [1, 1]])) == pytest.approx(expected)
    assert expected == pytest.approx(0.3437, abs=1e-4)


def test_report_on_hand_made_samples() -> None:
    # manifold 0: classes 3,3,3,1 ; manifold 1: 1,1,0,0 ; manifold 2: 3,3,3,3
    manifold = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    labels = [3, 3, 3, 1, 1, 1, 0, 0, 3, 3, 3, 3]
    probs = one_hot_probs(labels, 4, p=0.95)
    probs[0] = one_hot_probs([3], 4, p=0.5)[0]  # one unconfident sample
    rep = manifold_class_report(manifold, probs, 3)
    assert rep.histogram.tolist() == [[0, 1, 0, 3], [2, 2, 0, 0], [0, 0, 0, 4]]
    assert rep.purity == pytest.approx((3 / 4 + 2 / 4 + 1) / 3)
    assert rep.majority.tolist() == [3, 0, 3]  # ties go to the lower class
    assert rep.distinct_majorities == 2
    assert rep.confident == pytest.approx(11 / 12)
    assert rep.coverage.tolist() == pytest.approx([2 / 12, 3 / 12, 0.0, 7 / 12])
    assert rep.nmi == pytest.approx(normalized_mutual_information(rep.histogram))
    assert rep.summary()["min_class_share"] == 0.0
    assert "distinct majority classes 2" in rep.format()


def test_diversity_ratio() -> None:
    torch.manual_seed(0)
    real = torch.randn(40, 1, 4, 4)
    real_labels = torch.tensor([0] * 20 + [1] * 20)
    images = torch.cat([real[:20], real[:1].expand(20, 1, 4, 4)])  # manifold 0: real digits; 1: one image
    manifold = torch.tensor([0] * 20 + [1] * 20)
    probs = one_hot_probs([0] * 20 + [1] * 20, 2)
    rep = manifold_class_report(manifold, probs, 2, images=images, real_images=real, real_labels=real_labels)
    assert rep.diversity is not None
    assert rep.diversity[0] == pytest.approx(1.0)
    assert rep.diversity[1] == pytest.approx(0.0)


def test_mean_pairwise_distance_by_hand() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert mean_pairwise_distance(x) == pytest.approx((5 + 4 + 3) / 3)


@pytest.mark.parametrize(
    "manifold, probs, match",
    [
        (torch.zeros(0, dtype=torch.long), torch.zeros(0, 10), "non-empty"),
        (torch.zeros(3, dtype=torch.long), torch.full((3, 10), 0.5), "summing to 1"),
        (torch.zeros(3, dtype=torch.long), torch.full((2, 10), 0.1), "N = 3"),
        (torch.tensor([0, 1, 5]), torch.full((3, 10), 0.1), r"\[0, 2\)"),
    ],
)
def test_report_refuses_bad_input(manifold: torch.Tensor, probs: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        manifold_class_report(manifold, probs, 2)


def test_report_refuses_partial_diversity_inputs() -> None:
    with pytest.raises(ValueError, match="together"):
        manifold_class_report(torch.zeros(2, dtype=torch.long), torch.full((2, 2), 0.5), 1, images=torch.zeros(2, 3))


def test_sampled_report_refuses_wrong_classifier_size() -> None:
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 7))
    with pytest.raises(ValueError, match=r"\(5, 10\) logits"):
        sample_manifold_class_report(lambda i, n: torch.randn(n, 1, 2, 2), wrong, 2, 5)


def test_sampled_report_draws_every_manifold() -> None:
    # the "classifier" reads the class off the image: manifold i draws images filled with i
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        classifier[1].weight.zero_()
        classifier[1].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
        classifier[1].weight[:, 0] = torch.tensor([-100.0, 0.0, 100.0])
    rep = sample_manifold_class_report(lambda i, n: torch.full((n, 1, 2, 2), float(i - 1)), classifier, 3, 4,
                                       num_classes=3)
    assert rep.histogram.tolist() == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    assert rep.nmi == pytest.approx(1.0)
