"""How much memory one expert's forward pass needs, per input voxel (for tile sizing)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cahal_bids.engine.networks import ResidualUNet3D, validated_config

__all__ = ['estimate_peak_bytes_per_voxel']


def estimate_peak_bytes_per_voxel(
    config: Mapping[str, Any] | ResidualUNet3D, dtype: torch.dtype = torch.float32
) -> float:
    """Estimated peak activation memory of one inference forward, per input voxel.

    Walks the forward pass of :class:`ResidualUNet3D` (``torch.no_grad()``, batch 1,
    spatial sizes multiples of ``2 ** (levels - 1)``) and, at every convolution and norm,
    adds the tensors alive at that moment: the input, the skips kept for the decoder, the
    block input, the layer's input and output, plus a copy of the convolution's input and
    output (CPU oneDNN and cuDNN reorder or use workspaces of that order). The largest sum,
    in channels per input voxel, times the element size and a safety factor of 1.25, is the
    estimate. Weights, the framework's fixed footprint (on CPU a further 60-100 MB of
    oneDNN scratch for small inputs) and tiling accumulators are excluded. For a batch of
    ``b`` tiles multiply by ``b``. On CPU it lies 1.3-1.6x above the measured peak RSS
    growth (tests/test_networks.py); on GPU it is unmeasured (cuDNN workspaces vary).
    """
    cfg = validated_config(config.config() if isinstance(config, ResidualUNet3D) else config)
    c_in, c_out = cfg['in_channels'], cfg['out_channels']
    levels, n = cfg['levels'], cfg['convolutions_per_level']
    widths = [cfg['initial_filters'] * 2**level for level in range(levels)]
    scale = [8.0**-level for level in range(levels)]
    peak = 0.0

    def block(held: float, c0: float, c1: float, s: float) -> float:
        # held: tensors alive outside the block; its input (c0 channels) stays referenced
        # by the caller; the input of unit i > 0 is the previous unit's output (c1).
        worst = 0.0
        for i in range(n):
            inputs = c0 if i == 0 else c0 + c1
            conv_in = c0 if i == 0 else c1
            conv = held + (inputs + conv_in + 2 * c1) * s  # input and output, both copied
            norm = held + (inputs + 2 * c1) * s  # conv output and norm output
            worst = max(worst, conv, norm)
        return worst

    skips = 0.0
    held = float(c_in)  # the caller's input stays alive (it is added back at the end)
    for level in range(levels):
        c0 = c_in if level == 0 else widths[level - 1]
        peak = max(peak, block(held + skips, c0, widths[level], scale[level]))
        if level < levels - 1:
            skips += widths[level] * scale[level]
            pool = held + skips + widths[level] * scale[level + 1]
            peak = max(peak, pool)
    for level in reversed(range(levels - 1)):
        skips -= widths[level] * scale[level]
        deeper = widths[level + 1] * scale[level + 1]
        concat = held + skips + deeper + 4 * widths[level] * scale[level]
        peak = max(
            peak, concat, block(held + skips, 2 * widths[level], widths[level], scale[level])
        )
    head = held + widths[0] + 2 * c_out
    peak = max(peak, head)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 1.25 * peak * itemsize
