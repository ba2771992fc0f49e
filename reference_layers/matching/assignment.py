"""Soft and hard assignments from matching scores: voting, Hungarian, accuracy."""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
import scipy.optimize
from autograd.scipy.special import logsumexp
from autograd.tracer import getval

from .validation import positive_float



def voting_layer(X, temperature: float = 1.0):
    r"""The voting layer: a softmax over each row of the (``n x m``, or batched)
    assignment scores, ``V[i, a] = exp(X[i, a] / T) / sum_b exp(X[i, b] / T)``."""
    positive_float("temperature", temperature)
    Z = X / temperature
    return anp.exp(Z - logsumexp(Z, axis=-1, keepdims=True))


def hungarian(X) -> np.ndarray:
    """Discretize scores ``X`` (``n x m`` or batched) to the (partial) permutation
    maximizing ``sum X[i, pi(i)]`` (``scipy.optimize.linear_sum_assignment``).
    Evaluation only: not differentiable."""
    X = np.asarray(getval(X), float)
    out = np.zeros_like(X)
    for Xb, Ob in zip(X.reshape((-1,) + X.shape[-2:]), out.reshape((-1,) + X.shape[-2:])):
        rows, cols = scipy.optimize.linear_sum_assignment(Xb, maximize=True)
        Ob[rows, cols] = 1.0
    return out


def matching_accuracy(X_pred, X_true) -> float:
    """Fraction of the ground-truth matches (ones of ``X_true``) recovered."""
    X_pred, X_true = np.asarray(X_pred), np.asarray(X_true)
    return float((X_pred * X_true).sum() / max(X_true.sum(), 1))
