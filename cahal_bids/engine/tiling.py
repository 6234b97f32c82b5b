"""Network-agnostic tiled inference: sliding windows, tile sizing and out-of-memory fallback.

:func:`sliding_window_inference` runs any callable on overlapping tiles of a volume and
blends the tiles' outputs with a smooth separable window; with a pointwise predictor the
result equals the predictor applied to the whole volume bit for bit. A network whose
outputs see neighbours differs near each tile's cut faces (the convolutions zero-pad
there) and, with instance norm, everywhere (per-tile statistics); for a U-Net, tile
origins off the pooling grid also change every output. ``alignment`` and ``margin``
remove the first and last causes; :mod:`cahal_bids.engine.networks` freezes the statistics.
A recipe that reproduces the whole-volume output of a
:class:`~cahal_bids.engine.networks.ResidualUNet3D` ``net`` to float rounding::

    stats = estimate_norm_statistics(net, volume, block_size=tile)  # or no block_size
    with torch.no_grad(), net.frozen_norm_statistics(stats):
        out = sliding_window_inference(
            volume, net, tile_size=tile, alignment=net.size_multiple,
            margin=net.receptive_field_radius,
        )

>>> x = torch.arange(2 * 10 * 9 * 7, dtype=torch.float32).reshape(1, 2, 10, 9, 7)
>>> y = sliding_window_inference(x, lambda t: 2 * t + 1, tile_size=4, overlap=0.5)
>>> bool(torch.equal(y, 2 * x + 1))
True
>>> choose_tile_size((200, 220, 190), 1000.0, 8 * 2**30)
(168, 168, 168)
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from cahal_bids.core.errors import CahalError
from cahal_bids.core.memory import available_system_memory_bytes
from cahal_bids.engine.padding import pad_to_multiple

__all__ = [
    'FALLBACK_CPU_BYTES',
    'InsufficientMemoryError',
    'available_memory_bytes',
    'choose_tile_size',
    'run_tiled_with_fallback',
    'sliding_window_inference',
]

logger = logging.getLogger('cahal_bids.engine.tiling')

Predictor = Callable[[Tensor], Tensor]

FALLBACK_CPU_BYTES = 4 * 2**30
"""Memory assumed free when it cannot be read (no ``/proc/meminfo``, no psutil)."""

_OOM_MESSAGES = ('out of memory', "can't allocate memory", 'cannot allocate memory')


class InsufficientMemoryError(CahalError, MemoryError):
    """Even the smallest allowed tile does not fit in the memory available."""


def _triple(name: str, value: int | Sequence[int]) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
    ):
        raise ValueError(f'{name} must be one or three positive integers, got {value!r}')
    return values


def _index(region: Sequence[slice]) -> tuple[slice, ...]:
    """Index all batch items and channels of a spatial region."""
    return (slice(None), slice(None), *region)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every ``stride``, the last one flush with the edge."""
    if tile >= size:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def _axis_weights(
    origin: int, tile: int, size: int, margin: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Blending weights along one axis of one tile.

    A Hann bump ``sin(pi * (i + 0.5) / n) ** 2`` over the tile's trusted span, sampled at
    voxel centres, so it is smooth and never zero inside the span (its smallest value, at
    the span's ends, is about ``(pi / 2n) ** 2``, 1.5e-4 for ``n = 128``). The span is the
    tile less ``margin`` voxels on each side that is cut out of the volume; a side lying
    on the volume's own edge keeps its voxels (the whole volume ends there too).
    """
    low = 0 if origin == 0 else margin
    high = tile if origin + tile >= size else tile - margin
    weights = torch.zeros(tile, dtype=dtype, device=device)
    i = torch.arange(high - low, dtype=dtype, device=device)
    weights[low:high] = torch.sin(math.pi * (i + 0.5) / (high - low)).square()
    return weights


def sliding_window_inference(
    volume: Tensor,
    predictor: Predictor,
    *,
    tile_size: int | Sequence[int],
    overlap: float = 0.25,
    batch_size: int = 1,
    progress: bool = False,
    alignment: int = 1,
    margin: int = 0,
) -> Tensor:
    """Apply ``predictor`` to overlapping tiles of ``volume`` and blend the results.

    Parameters
    ----------
    volume:
        Tensor of shape ``(B, C, X, Y, Z)``; tiles are views of it, on its device.
    predictor:
        Any callable mapping ``(N, C, x, y, z)`` to ``(N, C_out, x, y, z)`` (a network, a
        lambda); it is responsible for devices and ``torch.no_grad()``.
    tile_size:
        Tile shape, one integer or three; axes longer than the volume are shrunk to it.
        If the tile covers the volume on every axis the predictor runs once, whole.
    overlap:
        Fraction of a tile's trusted span shared with its neighbour, in ``[0, 1)``: the
        stride is ``round((tile - 2 * margin) * (1 - overlap))`` rounded down to a multiple
        of ``alignment`` (at least ``alignment``); the last tile is flush with the edge.
    batch_size:
        Tiles per predictor call (concatenated along the batch axis).
    progress:
        Show a tqdm bar on stderr.
    alignment:
        Tile origins are multiples of this: give ``2 ** (levels - 1)`` for a U-Net so each
        tile's pooling grid coincides with the whole volume's. The volume is then
        replicate-padded at its high end to a multiple of ``alignment`` (as
        :class:`~cahal_bids.engine.networks.ResidualUNet3D` pads itself) and the output cropped;
        ``tile_size`` must be a multiple of ``alignment``.
    margin:
        Voxels at each tile side cut out of the volume whose prediction is discarded
        (weight zero): a network's output there is spoilt by the zero padding at the cut.
        With a margin of at least the network's receptive-field radius, frozen
        normalisation statistics and ``alignment``, tiles reproduce the whole-volume
        output. 0 (default) blends every voxel of every tile, as MONAI does.

    Returns
    -------
    Tensor
        ``(B, C_out, X, Y, Z)`` on the volume's device, in the predictor's output dtype:
        ``sum_t w_t * p_t / sum_t w_t`` with ``w_t`` a separable Hann window
        (:func:`_axis_weights`), accumulated in float64 (float32 on MPS), so a pointwise
        predictor gives exactly its whole-volume result. Deterministic: tiles are visited
        and summed in a fixed order.
    """
    if volume.ndim != 5:
        raise ValueError(f'volume must have shape (B, C, X, Y, Z), got {tuple(volume.shape)}')
    tile = _triple('tile_size', tile_size)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise ValueError(f'overlap must be a number in [0, 1), got {overlap!r}')
    for name, value, least in (
        ('batch_size', batch_size, 1),
        ('alignment', alignment, 1),
        ('margin', margin, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f'{name} must be an integer >= {least}, got {value!r}')
    if any(t % alignment for t in tile):
        raise ValueError(f'tile_size {tile} must be a multiple of alignment={alignment}')

    size = tuple(volume.shape[2:])
    if all(t >= s for t, s in zip(tile, size, strict=True)):
        out = predictor(volume)
        _check_output(out, volume, size)
        return out.to(volume.device)

    padded = pad_to_multiple(volume, alignment)
    shape = tuple(padded.shape[2:])
    tile = tuple(min(t, s) for t, s in zip(tile, shape, strict=True))  # type: ignore[assignment]
    axes_origins = []
    for t, s in zip(tile, shape, strict=True):
        if t == s:
            axes_origins.append([0])
            continue
        span = t - 2 * margin
        if span < alignment:
            raise ValueError(
                f'margin={margin} leaves no stride that is a multiple of alignment={alignment} '
                f'inside a tile of {t} voxels; use a larger tile or a smaller margin'
            )
        stride = max(alignment, round(span * (1 - overlap)) // alignment * alignment)
        axes_origins.append(_starts(s, t, stride))
    origins = list(itertools.product(*axes_origins))
    acc_dtype = torch.float32 if volume.device.type == 'mps' else torch.float64
    device = volume.device
    weights = torch.zeros(shape, dtype=acc_dtype, device=device)
    total: Tensor | None = None
    out_dtype = volume.dtype
    n = volume.shape[0]

    from tqdm.auto import tqdm

    with tqdm(
        total=len(origins), disable=not progress, file=sys.stderr, desc='tiles', unit='tile'
    ) as bar:
        for first in range(0, len(origins), batch_size):
            group = origins[first : first + batch_size]
            regions = [
                tuple(slice(o, o + t) for o, t in zip(origin, tile, strict=True))
                for origin in group
            ]
            batch = torch.cat([padded[_index(r)] for r in regions])
            out = predictor(batch)
            _check_output(out, batch, tile)
            out = out.to(device)
            if total is None:
                out_dtype = out.dtype
                total = torch.zeros((n, out.shape[1], *shape), dtype=acc_dtype, device=device)
            for k, (origin, region) in enumerate(zip(group, regions, strict=True)):
                wx, wy, wz = (
                    _axis_weights(o, t, s, margin, acc_dtype, device)
                    for o, t, s in zip(origin, tile, shape, strict=True)
                )
                window = wx[:, None, None] * wy[None, :, None] * wz[None, None, :]
                total[_index(region)] += out[k * n : (k + 1) * n].to(acc_dtype) * window
                weights[region] += window
            bar.update(len(group))
    if total is None:  # pragma: no cover - there is always at least one tile
        raise RuntimeError('no tile was run')
    result = (total / weights).to(out_dtype)
    return result[:, :, : size[0], : size[1], : size[2]]


def _check_output(out: object, given: Tensor, spatial: Sequence[int]) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f'predictor must return a Tensor, got {type(out).__name__}')
    if out.ndim != 5 or out.shape[0] != given.shape[0] or tuple(out.shape[2:]) != tuple(spatial):
        raise ValueError(
            f'predictor returned shape {tuple(out.shape)} for a tile of shape '
            f'{tuple(given.shape)}; the batch and spatial sizes must be kept'
        )


def choose_tile_size(
    volume_shape: Sequence[int],
    bytes_per_voxel: float,
    available_bytes: int,
    *,
    multiple: int = 8,
    min_size: int = 32,
    max_fraction: float = 0.6,
) -> tuple[int, int, int]:
    """Largest cubic tile, capped per axis by the volume, whose peak fits in memory.

    Candidate edges are multiples of ``multiple`` from the longest axis (rounded up) down
    to ``min_size`` (rounded up); each axis is capped at its own length rounded up to
    ``multiple``. The first candidate with ``voxels * bytes_per_voxel <= max_fraction *
    available_bytes`` wins. ``bytes_per_voxel`` is per tile voxel and per batch item
    (e.g. :func:`cahal_bids.engine.activation_memory.estimate_peak_bytes_per_voxel`);
    leave the memory held by the volume, the output and the blending accumulators out of
    ``available_bytes``.

    Raises
    ------
    InsufficientMemoryError
        When even the ``min_size`` tile does not fit.
    """
    if len(volume_shape) != 3 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in volume_shape
    ):
        raise ValueError(f'volume_shape must be three positive integers, got {volume_shape!r}')
    for name, value in (('multiple', multiple), ('min_size', min_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if not bytes_per_voxel > 0 or not math.isfinite(bytes_per_voxel):
        raise ValueError(f'bytes_per_voxel must be positive, got {bytes_per_voxel!r}')
    if not 0 < max_fraction <= 1:
        raise ValueError(f'max_fraction must be in (0, 1], got {max_fraction!r}')
    budget = max_fraction * available_bytes
    caps = [_round_up(s, multiple) for s in volume_shape]
    smallest = _round_up(min_size, multiple)
    top = max(caps)
    for edge in range(top, min(top, smallest) - 1, -multiple):
        tile = tuple(min(edge, c) for c in caps)
        if math.prod(tile) * bytes_per_voxel <= budget:
            return tile  # type: ignore[return-value]
    need = math.prod(min(smallest, c) for c in caps) * bytes_per_voxel
    raise InsufficientMemoryError(
        f'a {smallest}^3 tile needs about {need / 2**20:.0f} MiB but only '
        f'{budget / 2**20:.0f} MiB ({max_fraction:.0%} of {available_bytes / 2**20:.0f} MiB) '
        'may be used; free memory, use a smaller network or a lower precision'
    )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free_bytes(root: Path = Path('/sys/fs/cgroup')) -> int | None:
    """Memory left under a cgroup limit (v2 ``memory.max``, else v1), if one is set."""
    for limit_file, usage_file in (
        (root / 'memory.max', root / 'memory.current'),
        (root / 'memory' / 'memory.limit_in_bytes', root / 'memory' / 'memory.usage_in_bytes'),
    ):
        limit = _read_int(limit_file)
        if limit is None or limit >= 2**60:  # 'max' or v1's "unlimited" sentinel
            continue
        usage = _read_int(usage_file) or 0
        return max(0, limit - usage)
    return None


def available_memory_bytes(device: torch.device | str) -> int:
    """Memory free for tensors on ``device``, in bytes.

    * CUDA: free memory reported by ``torch.cuda.mem_get_info`` (other processes included;
      memory cached by this process's allocator counts as used).
    * CPU: ``MemAvailable`` from ``/proc/meminfo`` (Linux), else ``psutil`` when it is
      installed, else the conservative :data:`FALLBACK_CPU_BYTES` (4 GiB; macOS and
      Windows without psutil). A cgroup memory limit (v2 ``/sys/fs/cgroup/memory.max``
      or v1 ``memory.limit_in_bytes``) minus its current usage lowers the figure.
    * Any other device type: :data:`FALLBACK_CPU_BYTES`.
    """
    device = torch.device(device)
    if device.type == 'cuda':
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != 'cpu':
        return FALLBACK_CPU_BYTES
    available = available_system_memory_bytes()
    if available is None:
        try:
            import psutil
        except ImportError:
            available = FALLBACK_CPU_BYTES
        else:
            available = int(psutil.virtual_memory().available)
    if sys.platform.startswith('linux') and os.path.isdir('/sys/fs/cgroup'):
        limited = _cgroup_free_bytes()
        if limited is not None:
            available = min(available, limited)
    return available


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    if isinstance(error, InsufficientMemoryError):
        return False
    if isinstance(error, MemoryError):
        return True
    if isinstance(error, RuntimeError):
        message = str(error).lower()
        return any(text in message for text in _OOM_MESSAGES)
    return False


def _halved(
    tile: tuple[int, int, int], size: Sequence[int], multiple: int, floor: int, margin: int
) -> tuple[int, int, int] | None:
    """The tile halved per axis (see :func:`run_tiled_with_fallback`), or None if it cannot."""
    current = [min(t, _round_up(s, multiple)) for t, s in zip(tile, size, strict=True)]
    smaller = [max(min(floor, c), c // 2 // multiple * multiple) for c in current]
    if smaller == current:
        return None
    if any(h < s and h - 2 * margin < multiple for h, s in zip(smaller, size, strict=True)):
        return None  # the margin would leave too little of each tile
    return smaller[0], smaller[1], smaller[2]


def run_tiled_with_fallback(
    volume: Tensor,
    predictor: Predictor,
    *,
    tile_size: int | Sequence[int],
    overlap: float = 0.25,
    progress: bool = False,
    min_size: int = 32,
    multiple: int = 8,
    batch_size: int = 1,
    alignment: int = 1,
    margin: int = 0,
) -> tuple[Tensor, tuple[int, int, int]]:
    """:func:`sliding_window_inference`, halving the tile after each out-of-memory error.

    Out of memory means ``torch.OutOfMemoryError``, any ``MemoryError``, or a
    ``RuntimeError`` whose message says so (CUDA or the CPU allocator). Each axis of the
    tile (first capped at the volume's length rounded up to ``multiple``) is halved and
    rounded down to ``multiple``, but kept at least ``min_size`` rounded up to
    ``multiple`` (or the capped length, if shorter). When the tile cannot shrink any more,
    or the ``margin`` would leave less than ``multiple`` voxels of it, the error is raised
    again. Each fallback is logged as a warning on the ``cahal_bids.engine.tiling`` logger and
    the CUDA cache is emptied. A tile covering the volume means "try it whole first".
    ``multiple`` must be a multiple of ``alignment``; the other arguments are passed on.

    Returns the output and the tile size that succeeded.
    """
    tile = _triple('tile_size', tile_size)
    for name, value in (('min_size', min_size), ('multiple', multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if isinstance(alignment, int) and alignment >= 1 and multiple % alignment:
        raise ValueError(f'multiple={multiple} must be a multiple of alignment={alignment}')
    floor = _round_up(min_size, multiple)
    while True:
        failure: BaseException | None = None
        try:
            out = sliding_window_inference(
                volume,
                predictor,
                tile_size=tile,
                overlap=overlap,
                batch_size=batch_size,
                progress=progress,
                alignment=alignment,
                margin=margin,
            )
        except (RuntimeError, MemoryError) as error:
            if not _is_out_of_memory(error):
                raise
            failure = error
        else:
            return out, tile
        # Here, outside the handler, the failed attempt's frames and tensors can be freed.
        smaller = _halved(tile, volume.shape[2:], multiple, floor, margin)
        if smaller is None:
            raise failure
        logger.warning(
            'Out of memory with tiles of %s voxels (%s); retrying with %s',
            'x'.join(map(str, tile)),
            str(failure).splitlines()[0] if str(failure) else type(failure).__name__,
            'x'.join(map(str, smaller)),
        )
        failure = None
        if volume.device.type == 'cuda':
            torch.cuda.empty_cache()
        tile = smaller
