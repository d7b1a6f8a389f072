"""LogME: how well a trunk's features suit a target, from one forward pass and no training.

You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning" (ICML
2021): for each class, the log marginal evidence of a Bayesian linear regression from the
features to the class's one-hot indicator, with the prior and noise precisions (alpha, beta)
set by evidence maximisation; the score is the mean over classes, per example. Higher means the
features separate the target's classes better; it ranks candidate trunks before any finetuning.
"""

from __future__ import annotations

import math

import numpy as np

_MAX_ITERATIONS = 11  # the paper's fixed-point iteration converges in a few steps
_TOLERANCE = 0.01  # relative change of lambda = alpha / beta
_EPSILON = 1e-5  # keeps the precisions finite on a perfect fit


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score of ``features`` (N x D) for integer class ``labels`` (N,).

    Raises:
        ValueError: shapes that do not match, or fewer than two examples.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.shape != (f.shape[0],) or f.shape[0] < 2:
        raise ValueError(f"need N x D features and N labels, N >= 2; got {f.shape}, {y.shape}")
    n, d = f.shape
    # F^T F = V diag(sigma) V^T, once for every class.
    sigma, v = np.linalg.eigh(f.T @ f)
    sigma = np.clip(sigma, 0.0, None)
    scores = []
    for cls in np.unique(y):
        target = (y == cls).astype(np.float64)
        z = v.T @ (f.T @ target)  # the target in the eigenbasis
        # The paper's fixed point (as its reference code runs it): the posterior mean under
        # the current precisions, then new precisions from it, until lambda = alpha / beta settles.
        alpha, beta = 1.0, 1.0
        lam = alpha / beta
        for _ in range(_MAX_ITERATIONS):
            gamma = float(np.sum(sigma / (sigma + lam)))
            m = v @ (beta * z / (alpha + beta * sigma))  # the posterior mean weights
            weight_norm = float(m @ m) + _EPSILON
            residual = float(np.sum((target - f @ m) ** 2)) + _EPSILON
            alpha = gamma / weight_norm
            beta = (n - gamma) / residual
            new_lam = alpha / beta
            if abs(new_lam - lam) / lam < _TOLERANCE:
                break
            lam = new_lam
        evidence = (
            d / 2 * math.log(alpha)
            + n / 2 * math.log(beta)
            - 0.5 * float(np.sum(np.log(alpha + beta * sigma)))
            - beta / 2 * residual
            - alpha / 2 * weight_norm
            - n / 2 * math.log(2 * math.pi)
        )
        scores.append(evidence / n)
    return float(np.mean(scores))
