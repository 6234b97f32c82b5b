"""Whole-volume instance-norm statistics of a :class:`~cahal_bids.engine.networks.ResidualUNet3D`.

A tile normalised with its own statistics differs from the whole volume everywhere
(see :mod:`cahal_bids.engine.networks`). :func:`estimate_norm_statistics` measures
every norm layer's whole-volume input statistics, from one whole forward or, for
volumes too large to run whole, exactly layer by layer from haloed blocks;
:meth:`~cahal_bids.engine.networks.ResidualUNet3D.frozen_norm_statistics` then
applies them to tiles. (Zoos that declare patch-mean statistics use
:mod:`cahal_bids.engine.patch_statistics` instead.)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cahal_bids.engine.networks import FreezableInstanceNorm3d, ResidualUNet3D
from cahal_bids.engine.padding import pad_to_multiple

__all__ = ['NormStatistics', 'StatisticsRecorder', 'estimate_norm_statistics']


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps sums of millions of voxels exact enough; MPS has no float64.
    return torch.float32 if device.type == 'mps' else torch.float64


class _StopForward(Exception):
    """Raised by a recorder to end a forward pass once its layer is recorded."""


class StatisticsRecorder:
    """Sums each norm layer's input, per channel, over the region a block owns.

    ``region`` is given in voxels of the network's input (``(start, stop)`` per axis,
    multiples of the layer's stride); a layer with stride ``s`` sums ``[start // s,
    stop // s)`` of its feature map. With a ``target`` only that layer is recorded, and
    ``stop`` ends the forward pass right after it.
    """

    def __init__(self, target: FreezableInstanceNorm3d | None = None, stop: bool = False) -> None:
        self.region: tuple[tuple[int, int], ...] | None = None
        self.target = target
        self.stop = stop
        self._sums: dict[FreezableInstanceNorm3d, tuple[Tensor, Tensor, int]] = {}

    def record(self, norm: FreezableInstanceNorm3d, x: Tensor) -> None:
        if self.target is not None and norm is not self.target:
            return
        if self.region is None:
            raise RuntimeError('statistics recorder used without a region')
        s = norm.stride
        index = (slice(None), slice(None), *(slice(a // s, b // s) for a, b in self.region))
        part = x[index].to(_accumulator_dtype(x.device))
        dims = (0, 2, 3, 4)
        if norm in self._sums:
            total, squares, count = self._sums[norm]
        else:
            total = squares = torch.zeros((), dtype=part.dtype, device=part.device)
            count = 0
        self._sums[norm] = (
            total + part.sum(dims),
            squares + part.square().sum(dims),
            count + part.numel() // part.shape[1],
        )
        if self.stop:
            raise _StopForward

    def pair(self, norm: FreezableInstanceNorm3d) -> tuple[Tensor, Tensor]:
        total, squares, count = self._sums[norm]
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0.0)
        return mean.float().cpu(), var.float().cpu()


@dataclass(frozen=True)
class NormStatistics:
    """Per-channel ``(mean, biased variance)`` of every norm layer's input, in order.

    Tensors are float32 on the CPU; they are moved to the data's device when used.
    """

    layers: tuple[tuple[Tensor, Tensor], ...]

    def max_relative_difference(self, other: NormStatistics) -> float:
        """Largest difference between two sets, relative to each layer's standard deviation."""
        if len(self.layers) != len(other.layers):
            raise ValueError('statistics of different networks cannot be compared')
        worst = 0.0
        for (m1, v1), (m2, v2) in zip(self.layers, other.layers, strict=True):
            scale = v1.sqrt().clamp_min(1e-12)
            worst = max(
                worst,
                float(((m1 - m2).abs() / scale).max()),
                float(((v1.sqrt() - v2.sqrt()).abs() / scale).max()),
            )
        return worst


def _block_grid(
    shape: Sequence[int], block: Sequence[int], halo: int
) -> Iterator[tuple[tuple[slice, ...], tuple[tuple[int, int], ...]]]:
    """Cores tiling ``shape`` without overlap, each with ``halo`` voxels of context.

    Yields the slice of each block (core plus halo, clipped to the volume) and the core's
    region relative to the block.
    """
    axes = []
    for size, b in zip(shape, block, strict=True):
        core = size if b >= size else b - 2 * halo
        spans = []
        for start in range(0, size, core):
            stop = min(start + core, size)
            low, high = max(0, start - halo), min(size, stop + halo)
            spans.append((slice(low, high), (start - low, stop - low)))
        axes.append(spans)
    for parts in itertools.product(*axes):
        yield tuple(p[0] for p in parts), tuple(p[1] for p in parts)


def estimate_norm_statistics(
    model: ResidualUNet3D,
    volume: Tensor,
    *,
    block_size: int | Sequence[int] | None = None,
    halo: int | None = None,
) -> NormStatistics:
    """Whole-volume input statistics of every norm layer, for tile-consistent inference.

    The volume is replicate-padded at its high end to a multiple of
    ``model.size_multiple``, as the network pads it when run whole.

    * ``block_size=None``, or a block covering the padded volume: one whole forward; the
      statistics are exactly those instance norm computes on the whole volume.
    * Otherwise, for volumes too large to run whole, layer by layer: the padded volume is
      cut into non-overlapping cores, each run with ``halo`` voxels of context per side
      (clipped at the volume's edges, so a forward sees at most ``block_size`` voxels
      per axis); layer ``k`` sums its input over the cores, with layers ``< k`` frozen to
      the statistics already measured, and the pass stops right after layer ``k``. With
      the default halo, the receptive-field radius of layer ``k``
      (:meth:`ResidualUNet3D.norm_receptive_radii`, rounded up to ``size_multiple``), the
      result equals the whole-volume statistics to float rounding; a smaller ``halo``
      (fixed for all layers) is faster and approximate. It costs one partial forward of
      the whole volume per norm layer (``4 * levels - 2`` with two convolutions per
      level), plus the halos.

    ``volume`` has shape ``(1, in_channels, X, Y, Z)`` and lives on the model's device;
    ``block_size`` and ``halo`` must be multiples of ``model.size_multiple``. The model is
    run under ``torch.no_grad()``.

    Raises
    ------
    ValueError
        For a bad shape, or a ``block_size`` too small to hold twice the halo.
    """
    if volume.ndim != 5 or volume.shape[0] != 1 or volume.shape[1] != model.in_channels:
        raise ValueError(
            f'volume must have shape (1, {model.in_channels}, X, Y, Z), got {tuple(volume.shape)}'
        )
    m = model.size_multiple
    padded = pad_to_multiple(volume, m, avoid_single_voxel=True)
    shape = tuple(padded.shape[2:])
    if block_size is None:
        blocks = shape
    elif isinstance(block_size, int):
        blocks = (block_size,) * 3
    else:
        blocks = tuple(block_size)
    if len(blocks) != 3 or any(
        isinstance(b, bool) or not isinstance(b, int) or b < m or b % m for b in blocks
    ):
        raise ValueError(f'block_size must hold positive multiples of {m}, got {block_size!r}')
    blocks = tuple(min(b, s) for b, s in zip(blocks, shape, strict=True))
    if halo is not None and (
        isinstance(halo, bool) or not isinstance(halo, int) or halo < 0 or halo % m
    ):
        raise ValueError(f'halo must be a non-negative multiple of {m}, got {halo!r}')
    norms = model.norm_layers()

    if blocks == shape:
        recorder = StatisticsRecorder()
        recorder.region = tuple((0, s) for s in shape)
        _set_recorder(norms, recorder)
        try:
            with torch.no_grad():
                model(padded)
        finally:
            _set_recorder(norms, None)
        return NormStatistics(tuple(recorder.pair(norm) for norm in norms))

    halos = [_round_up(r, m) if halo is None else halo for r in model.norm_receptive_radii()]
    if any(b < s and b - 2 * max(halos) < m for b, s in zip(blocks, shape, strict=True)):
        raise ValueError(
            f'block_size {blocks} leaves no core inside a halo of {max(halos)} voxels; '
            'use larger blocks or a smaller halo'
        )
    pairs: list[tuple[Tensor, Tensor]] = []
    previous = [norm._frozen for norm in norms]
    try:
        for norm, layer_halo in zip(norms, halos, strict=True):
            recorder = StatisticsRecorder(target=norm, stop=True)
            _set_recorder(norms, recorder)
            with torch.no_grad():
                for block, region in _block_grid(shape, blocks, layer_halo):
                    recorder.region = region
                    try:
                        model(padded[(slice(None), slice(None)) + block])
                    except _StopForward:
                        pass
            pairs.append(recorder.pair(norm))
            norm._frozen = pairs[-1]
    finally:
        _set_recorder(norms, None)
        for norm, old in zip(norms, previous, strict=True):
            norm._frozen = old
    return NormStatistics(tuple(pairs))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _set_recorder(
    norms: Sequence[FreezableInstanceNorm3d], recorder: StatisticsRecorder | None
) -> None:
    for norm in norms:
        norm._recorder = recorder
