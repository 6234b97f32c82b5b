"""Overlap measures between label maps, defined once for training, evaluation and tests."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from cahal_bids.core.validation import check_int

__all__ = ['dice_per_class']


def dice_per_class(
    pred_labels: npt.ArrayLike, true_labels: npt.ArrayLike, n_classes: int = 4
) -> dict[int, float]:
    """Hard Dice of each class label ``0 .. n_classes - 1`` (background included).

    A class absent from both label maps gets ``nan`` (use ``np.nanmean`` to average).

    >>> a = np.array([0, 1, 1, 2])
    >>> dice_per_class(a, np.array([0, 1, 2, 2]), n_classes=4)
    {0: 1.0, 1: 0.6666666666666666, 2: 0.6666666666666666, 3: nan}
    """
    n_classes = check_int('n_classes', n_classes, 1)
    pred = np.asarray(pred_labels)
    true = np.asarray(true_labels)
    if pred.shape != true.shape:
        raise ValueError(f'label maps differ in shape: {pred.shape} vs {true.shape}')
    scores: dict[int, float] = {}
    for label in range(n_classes):
        in_pred = pred == label
        in_true = true == label
        size = int(in_pred.sum()) + int(in_true.sum())
        overlap = int(np.logical_and(in_pred, in_true).sum())
        scores[label] = 2.0 * overlap / size if size else math.nan
    return scores
