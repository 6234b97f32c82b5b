"""Instance-norm statistics of an expert as it saw them in training.

An expert learns on small patches (64^3 voxels) centred on head voxels, and each of
its instance-norm layers normalises a patch with that patch's own per-channel mean and
variance. Run once on a whole field of view, the same layers would use statistics
dominated by background air: a regime the expert never met in training, which on the
validation subject cost between 0.3 and 1.9 dB of PSNR depending on the cell.

:func:`patch_mean_statistics` measures instead what training saw, the mean of each
layer's per-patch statistics over a few head-centred patches of the training size,
picked with a seeded generator (so an image always gets the same statistics). Frozen
with :meth:`~cahal_bids.engine.networks.ResidualUNet3D.frozen_norm_statistics`, they turn the
expert into a fixed convolutional operator for that image: the whole-volume run and any
tiled run agree, and no whole-volume statistics pass is needed before tiling. Inference
folds them into the convolutions
(:meth:`~cahal_bids.engine.networks.ResidualUNet3D.with_folded_norms`), which also saves the norm
layers' pass over every feature map.

A zoo says which statistics its experts need in its manifest
(:data:`PATCH_MEAN_DEFAULTS` for zoos trained by this package; zoos without the entry
use whole-volume statistics, as the first releases did).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from cahal_bids.engine.networks import ResidualUNet3D
    from cahal_bids.engine.norm_statistics import NormStatistics

__all__ = [
    'METHODS',
    'PATCH_MEAN_DEFAULTS',
    'patch_centres',
    'patch_mean_statistics',
    'validated_norm_statistics',
]

METHODS = ('whole-volume', 'patch-mean')
"""``whole-volume``: instance norm over the whole image (the first zoos); ``patch-mean``."""

PATCH_MEAN_DEFAULTS: dict[str, Any] = {
    'method': 'patch-mean',
    'patch_size': 64,
    'patches': 8,
    'seed': 0,
}
"""The manifest entry written for zoos trained here (``patch_size`` = training patches)."""

_CENTRE_STRIDE = 4
"""Candidate patch centres are taken on a lattice of this step (enough for a head)."""


def validated_norm_statistics(entry: object, *, where: str) -> dict[str, Any]:
    """Check a manifest's ``norm_statistics`` entry; ``None`` means whole-volume."""
    if entry is None:
        return {'method': 'whole-volume'}
    if not isinstance(entry, Mapping) or entry.get('method') not in METHODS:
        raise ValueError(f'{where}: "norm_statistics" must name a method among {list(METHODS)}')
    if entry['method'] == 'whole-volume':
        return {'method': 'whole-volume'}
    checked: dict[str, Any] = {'method': 'patch-mean'}
    for key, minimum in (('patch_size', 8), ('patches', 1), ('seed', 0)):
        value = entry.get(key, PATCH_MEAN_DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(
                f'{where}: "norm_statistics.{key}" must be an integer >= {minimum}, got {value!r}'
            )
        checked[key] = value
    return checked


def patch_centres(
    foreground: np.ndarray, *, count: int, seed: int, stride: int = _CENTRE_STRIDE
) -> list[tuple[int, int, int]]:
    """Up to ``count`` distinct foreground voxels, drawn uniformly from a lattice.

    ``foreground`` is a boolean volume; candidates are its voxels on a lattice of step
    ``stride`` (offset ``stride // 2``). An empty foreground gives the volume's centre.
    """
    if foreground.ndim != 3:
        raise ValueError(f'foreground must be 3D, got shape {foreground.shape}')
    start = stride // 2
    lattice = foreground[start::stride, start::stride, start::stride]
    candidates = np.flatnonzero(lattice)
    if candidates.size == 0:
        return [tuple(int(n) // 2 for n in foreground.shape)]  # type: ignore[list-item]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(candidates, size=min(count, candidates.size), replace=False)
    return [
        tuple(start + stride * int(i) for i in np.unravel_index(flat, lattice.shape))  # type: ignore[misc]
        for flat in np.sort(chosen)
    ]


def _patch_slices(
    centre: tuple[int, int, int], size: int, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """A cube of edge ``size`` around ``centre``, shifted to lie inside ``shape``."""
    slices = []
    for c, n in zip(centre, shape, strict=True):
        edge = min(size, n)
        start = min(max(c - size // 2, 0), n - edge)
        slices.append(slice(start, start + edge))
    return tuple(slices)


def patch_mean_statistics(
    model: ResidualUNet3D,
    volume: Tensor,
    *,
    foreground_level: float,
    patch_size: int = 64,
    patches: int = 8,
    seed: int = 0,
    batch_size: int | None = None,
) -> NormStatistics:
    """Mean per-patch instance-norm statistics of every norm layer of ``model``.

    ``volume`` has shape ``(1, C, X, Y, Z)`` on the model's device; patch centres are
    drawn among voxels of channel 0 above ``foreground_level`` (the head). Each patch is
    run through ``model`` as in training (its own instance-norm statistics; the model
    pads it to its size multiple); the per-channel mean and biased variance of every
    norm layer's input are averaged over the patches, in float32 whatever autocast does.
    A volume no larger than a patch gives exactly its own instance-norm statistics.
    Patches run ``batch_size`` at a time (default: all in one batch).
    """
    import torch

    from cahal_bids.engine.norm_statistics import NormStatistics

    if volume.ndim != 5 or volume.shape[0] != 1:
        raise ValueError(f'volume must have shape (1, C, X, Y, Z), got {tuple(volume.shape)}')
    shape = tuple(int(n) for n in volume.shape[2:])
    foreground = (volume[0, 0] > foreground_level).cpu().numpy()
    centres = patch_centres(foreground, count=patches, seed=seed)
    norms = model.norm_layers()
    sums: dict[Any, list[Tensor]] = {}

    def record(layer: Any, inputs: tuple[Tensor, ...]) -> None:
        # each patch's own instance-norm statistics, summed over the batch
        var, mean = torch.var_mean(inputs[0].float(), dim=(2, 3, 4), correction=0)
        if layer in sums:
            sums[layer][0] += mean.sum(0)
            sums[layer][1] += var.sum(0)
        else:
            sums[layer] = [mean.sum(0), var.sum(0)]

    windows = [
        volume[(slice(None), slice(None), *_patch_slices(centre, patch_size, shape))]
        for centre in centres
    ]
    step = len(windows) if batch_size is None else max(1, batch_size)
    hooks = [norm.register_forward_pre_hook(record) for norm in norms]
    try:
        with torch.no_grad():
            for start in range(0, len(windows), step):
                # every patch has the same shape, so they run as batches
                model(torch.cat(windows[start : start + step]))
    finally:
        for hook in hooks:
            hook.remove()
    count = len(windows)
    return NormStatistics(
        tuple(((sums[n][0] / count).cpu(), (sums[n][1] / count).cpu()) for n in norms)
    )
