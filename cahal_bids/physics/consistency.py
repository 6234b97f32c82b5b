"""Data consistency: how well a 1 mm estimate, acquired again, reproduces what was acquired.

"Restore, don't hallucinate" has a check that needs no ground truth: acquiring the
restored image again with the box point-spread function of the input's voxels must
give back the input. :func:`acquisition_rmse` measures the difference; the enhancer
records it next to the trilinear reference's and warns when the restored image agrees
less with the acquired data than plain interpolation does.

>>> import numpy as np
>>> low = np.arange(8.0, dtype=np.float32).reshape(2, 2, 2)
>>> upsampled = np.repeat(low, 2, axis=2)  # a 1 x 1 x 2 mm acquisition, restored exactly
>>> acquisition_rmse(upsampled, low, (1.0, 1.0, 2.0), data_range=7.0)
0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ['acquisition_rmse', 'reacquire']


def reacquire(estimate: np.ndarray, resolution: Sequence[float]) -> np.ndarray:
    """``estimate`` (1 mm grid) acquired again at ``resolution`` (box PSF, no offset)."""
    import torch

    from cahal_bids.physics.degradation import degrade

    _, low = degrade(
        torch.from_numpy(np.ascontiguousarray(estimate, dtype=np.float32)),
        tuple(float(r) for r in resolution),
        return_low_resolution=True,
    )
    return low.numpy()


def acquisition_rmse(
    estimate: np.ndarray,
    low: np.ndarray,
    resolution: Sequence[float],
    *,
    data_range: float,
    mask: np.ndarray | None = None,
) -> float:
    """RMSE between ``estimate`` acquired again and the acquired ``low``, in ``data_range`` units.

    ``mask`` (on the 1 mm grid) limits the comparison to low-resolution voxels at least
    half covered by it. The re-acquired grid and ``low`` are compared on their common
    extent (the 1 mm grid holds ``round(n * r)`` voxels, so the last low-resolution voxel
    can be partial).
    """
    again = reacquire(estimate, resolution)
    common = tuple(slice(0, min(a, b)) for a, b in zip(again.shape, low.shape, strict=True))
    again, acquired = again[common], np.asarray(low, dtype=np.float64)[common]
    if mask is None:
        inside = np.ones(again.shape, dtype=bool)
    else:
        inside = reacquire(mask.astype(np.float32), resolution)[common] >= 0.5
    if not inside.any():
        return float('nan')
    difference = again[inside].astype(np.float64) - acquired[inside]
    return float(np.sqrt(np.mean(difference**2)) / data_range)
