"""No hallucination on flat regions: what an expert adds to images with no detail to restore.

Three featureless images are acquired at 1 x 1 x 4 mm (cell V4A1) and restored:

- ``constant``: one intensity everywhere;
- ``two halves``: two flat regions meeting at one sharp in-plane step;
- ``ramp``: a gentle in-plane intensity gradient.

Along the thick axis nothing varies, so the trilinear input is already the exact answer
and whatever the expert adds is invented. The relative change ``|restored - input| /
|input|`` is summarised away from the image borders (where the expert sees zero
padding): mean, 95th percentile and maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ['FLAT_RESOLUTION', 'flat_images', 'flat_region_changes', 'flat_region_table']

FLAT_RESOLUTION = (1.0, 1.0, 4.0)
BORDER = 8
"""Voxels (1 mm) left out at every face of the restored image."""


def flat_images(shape: Sequence[int] = (64, 64, 16)) -> dict[str, np.ndarray]:
    """The three low-resolution test images, of ``shape`` voxels at 1 x 1 x 4 mm."""
    size = tuple(int(n) for n in shape)
    x, y, _ = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in size), indexing='ij')
    half = size[0] // 2
    return {
        'constant': np.full(size, 100.0, dtype=np.float32),
        'two halves': np.where(x < half, 80.0, 120.0).astype(np.float32),
        'ramp': (60.0 + 40.0 * x / max(size[0], 1) + 20.0 * y / max(size[1], 1)).astype(
            np.float32
        ),
    }


def flat_region_changes(
    enhancer: Any, shape: Sequence[int] = (64, 64, 16)
) -> dict[str, dict[str, float]]:
    """Relative change (in %) the routed expert makes to each flat image.

    ``enhancer`` is a :class:`cahal_bids.engine.inference.Enhancer`; ``shape`` the
    low-resolution size (the restored image is four times longer along the last axis).
    """
    from cahal_bids.core.grid import low_resolution_affine
    from cahal_bids.core.routing import route

    affine = low_resolution_affine(np.eye(4), FLAT_RESOLUTION)
    decision = route(FLAT_RESOLUTION)
    results: dict[str, dict[str, float]] = {}
    for name, low in flat_images(shape).items():
        restored, _, _ = enhancer.restore(low, affine, decision)
        upsampled = np.repeat(low, 4, axis=2)
        inner = tuple(slice(BORDER, n - BORDER) for n in upsampled.shape)
        change = np.abs(restored[inner] - upsampled[inner]) / np.abs(upsampled[inner])
        results[name] = {
            'mean_percent': float(100 * change.mean()),
            'p95_percent': float(100 * np.percentile(change, 95)),
            'max_percent': float(100 * change.max()),
        }
    return results


def flat_region_table(changes: dict[str, dict[str, float]], low_shape: Sequence[int]) -> str:
    """The Markdown paragraph and table of :func:`flat_region_changes`'s result."""
    lines = [
        '| image | mean change | 95th percentile | max |',
        '| --- | ---: | ---: | ---: |',
    ]
    for name, change in changes.items():
        lines.append(
            f'| {name} | {change["mean_percent"]:.2f} % | {change["p95_percent"]:.2f} % | '
            f'{change["max_percent"]:.2f} % |'
        )
    return (
        f'\nFlat regions (no detail to restore), {low_shape[0]} x {low_shape[1]} x '
        f'{low_shape[2]} voxels at 1 x 1 x 4 mm, change made by CAHAL relative to the '
        'exact input:\n\n' + '\n'.join(lines) + '\n'
    )
