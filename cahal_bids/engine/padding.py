"""High-end replicate padding of 3D batches to a multiple of a network's pooling size.

Padding only at the high end keeps the low-end voxel grid identical to the input's,
which tiled inference relies on; replicate padding works for axes of any length
(reflect needs the axis longer than the pad).

>>> import torch
>>> pad_to_multiple(torch.zeros(1, 1, 5, 8, 3), 4).shape
torch.Size([1, 1, 8, 8, 4])
>>> pad_to_multiple(torch.zeros(1, 1, 3, 2, 4), 4, avoid_single_voxel=True).shape
torch.Size([1, 1, 4, 4, 8])
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ['pad_to_multiple']


def pad_to_multiple(x: Tensor, multiple: int, *, avoid_single_voxel: bool = False) -> Tensor:
    """Replicate-pad the three spatial axes of ``x`` at their high end to ``multiple``.

    With ``avoid_single_voxel``, an input that would leave a single voxel at the
    deepest level (every axis at most ``multiple``) gets its last axis padded to
    ``2 * multiple``: instance norm cannot normalise one voxel.
    """
    target = [-(-size // multiple) * multiple for size in x.shape[2:]]
    if avoid_single_voxel and all(t == multiple for t in target):
        target[-1] = 2 * multiple
    pads: list[int] = []
    for size, t in zip(reversed(x.shape[2:]), reversed(target), strict=True):
        pads += [0, t - size]  # F.pad lists the last axis first
    if not any(pads):
        return x
    return F.pad(x, pads, mode='replicate')
