"""LogME ranks features by how well they separate a target's classes, with no training."""

from __future__ import annotations

import numpy as np
import pytest

from dtlray.logme import logme


def features(noise: float, n: int = 300, d: int = 32, classes: int = 5, seed: int = 0):
    """Features whose first ``classes`` dimensions encode the class, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=n)
    f = rng.normal(size=(n, d)) * noise
    f[np.arange(n), labels] += 1.0
    return f, labels


def test_more_informative_features_score_higher() -> None:
    scores = [logme(*features(noise)) for noise in (0.1, 0.5, 1.0, 3.0)]
    assert scores == sorted(scores, reverse=True)
    f, labels = features(0.5)
    shuffled = np.random.default_rng(1).permutation(labels)  # features that say nothing
    assert logme(f, labels) > logme(f, shuffled) + 0.1


def test_scores_are_finite_order_free_and_need_matching_shapes() -> None:
    f, labels = features(0.5, n=50, d=128)  # more dimensions than examples
    score = logme(f, labels)
    assert np.isfinite(score)
    order = np.random.default_rng(2).permutation(len(labels))  # examples have no order
    assert logme(f[order], labels[order]) == pytest.approx(score, rel=1e-9)
    with pytest.raises(ValueError, match="N x D features and N labels"):
        logme(f, labels[:-1])
