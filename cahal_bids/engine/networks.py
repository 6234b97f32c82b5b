"""Residual 3D U-Net experts, and what tiled inference needs to know about them.

Each CAHAL expert is a :class:`ResidualUNet3D`: a 3D U-Net whose levels stack
``[Conv3d(3x3x3) -> InstanceNorm3d(affine) -> LeakyReLU]`` blocks, whose width doubles
at each level, and whose output is added to its input (global residual), so the network
only learns the correction that restores the image.

Design choices (fixed, not hyperparameters):

* downsampling by ``MaxPool3d(2)``; upsampling by ``ConvTranspose3d(kernel=2, stride=2)``
  (non-overlapping, so no checkerboard); skips joined by concatenation; 1x1x1 head;
* convolutions followed by instance norm carry no bias (the norm would remove it);
* inputs of any size: each spatial axis is padded at its **high end** with **replicate**
  padding up to a multiple of ``2 ** (levels - 1)`` and the output is cropped back (an
  input that would leave one voxel at the deepest level gets its last axis padded twice
  as far, since instance norm cannot normalise a single voxel).
  Replicate works for axes of any length (reflect needs the axis longer than the pad),
  and padding only at the high end keeps the low-end voxel grid identical to the input's,
  which :func:`cahal_bids.engine.tiling.sliding_window_inference` relies on (``alignment``).

Tiles and the whole volume
--------------------------
A tile run through this network differs from the same region of the whole volume for
two reasons, both large for a random-weight network (measured: 5e-2 to 4e-1 of the
output range, tests/test_tiling.py):

1. instance norm normalises with the statistics of whatever it is given, so a tile
   normalised with its own statistics differs everywhere, not only near its edges;
2. the convolutions zero-pad at the tile's cut faces, which changes every output voxel
   within :attr:`ResidualUNet3D.receptive_field_radius` of a cut (26 voxels for
   ``levels=3``, 58 for the paper's ``levels=4``); beyond it outputs are exact.

The norm layers here (:class:`FreezableInstanceNorm3d`) can use statistics frozen to the
whole volume's: :func:`estimate_norm_statistics` measures them (from one whole forward,
or exactly layer by layer from haloed blocks when the volume does not fit) and
:meth:`ResidualUNet3D.frozen_norm_statistics` applies them. With those, tile origins
aligned to :attr:`ResidualUNet3D.size_multiple` and a discarded margin of
``receptive_field_radius`` voxels (:func:`cahal_bids.engine.tiling.sliding_window_inference`'s
``alignment`` and ``margin``), tiled output equals the whole-volume output to float
rounding (5e-7 of the range measured).

>>> net = ResidualUNet3D(levels=2, initial_filters=4)
>>> x = torch.rand(1, 1, 7, 6, 5)
>>> bool(torch.equal(net(x), x))  # zero-initialised head: an untrained expert is the identity
True
>>> ResidualUNet3D.from_config(net.config()).config() == net.config()
True
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    'FreezableInstanceNorm3d',
    'NormStatistics',
    'ResidualUNet3D',
    'count_parameters',
    'estimate_norm_statistics',
    'estimate_peak_bytes_per_voxel',
]

_DEFAULTS: dict[str, Any] = {
    'in_channels': 1,
    'out_channels': 1,
    'levels': 4,
    'initial_filters': 64,
    'convolutions_per_level': 2,
    'negative_slope': 0.01,
    'residual': True,
    'zero_init_head': True,
}


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{name} must be True or False, got {value!r}')
    return value


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps sums of millions of voxels exact enough; MPS has no float64.
    return torch.float32 if device.type == 'mps' else torch.float64


def _pad_high(x: Tensor, multiple: int) -> Tensor:
    """Replicate-pad the three spatial axes of ``x`` at their high end to ``multiple``.

    If that would leave a single voxel at the deepest level (all three axes at most
    ``multiple``), the last axis is padded to ``2 * multiple``: instance norm cannot
    normalise one voxel.
    """
    target = [-(-size // multiple) * multiple for size in x.shape[2:]]
    if all(t == multiple for t in target):
        target[-1] = 2 * multiple
    pads: list[int] = []
    for size, t in zip(reversed(x.shape[2:]), reversed(target), strict=True):
        pads += [0, t - size]  # F.pad lists the last axis first
    if not any(pads):
        return x
    return F.pad(x, pads, mode='replicate')


class FreezableInstanceNorm3d(nn.InstanceNorm3d):
    """Affine instance norm that can use frozen, whole-volume statistics instead.

    By default it behaves exactly like ``nn.InstanceNorm3d(num_features, affine=True)``
    (same parameters and state-dict keys). Inside
    :meth:`ResidualUNet3D.frozen_norm_statistics` it normalises every sample with the
    per-channel ``(mean, variance)`` it was given, so a tile is normalised as the whole
    volume would have been.

    Parameters
    ----------
    num_features:
        Number of channels.
    stride:
        How many input voxels one voxel of this layer's feature map spans along each axis
        (``2 ** level``); used to map input-space regions onto the feature map.
    """

    def __init__(self, num_features: int, *, stride: int = 1) -> None:
        super().__init__(num_features, affine=True)
        self.stride = _check_positive_int('stride', stride)
        self._frozen: tuple[Tensor, Tensor] | None = None
        self._recorder: _StatisticsRecorder | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self._recorder is not None:
            self._recorder.record(self, x)
        if self._frozen is None:
            return super().forward(x)
        mean, var = self._frozen
        # in float32 whatever the activations (bfloat16 under autocast), like the whole
        # volume's instance norm, then back to the activations' type
        return F.batch_norm(
            x.float(),
            mean.to(device=x.device, dtype=torch.float32),
            var.to(device=x.device, dtype=torch.float32),
            self.weight.float(),
            self.bias.float(),
            training=False,
            eps=self.eps,
        ).to(x.dtype)


class _StopForward(Exception):
    """Raised by a recorder to end a forward pass once its layer is recorded."""


class _StatisticsRecorder:
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


def _validated_config(config: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Complete ``config`` (and keyword overrides) with defaults and validate every value."""
    given = {**(config or {}), **kwargs}
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f'unknown ResidualUNet3D config keys: {", ".join(unknown)}')
    cfg = {**_DEFAULTS, **given}
    for name in ('in_channels', 'out_channels', 'levels', 'initial_filters'):
        _check_positive_int(name, cfg[name])
    _check_positive_int('convolutions_per_level', cfg['convolutions_per_level'])
    slope = cfg['negative_slope']
    if (
        isinstance(slope, bool)
        or not isinstance(slope, (int, float))
        or not math.isfinite(slope)
        or not 0 <= slope < 1
    ):
        raise ValueError(f'negative_slope must be a number in [0, 1), got {slope!r}')
    cfg['negative_slope'] = float(slope)
    _check_bool('residual', cfg['residual'])
    _check_bool('zero_init_head', cfg['zero_init_head'])
    if cfg['residual'] and cfg['in_channels'] != cfg['out_channels']:
        raise ValueError(
            f'residual=True needs in_channels == out_channels, got in_channels='
            f'{cfg["in_channels"]} and out_channels={cfg["out_channels"]}'
        )
    return cfg


class _ConvBlock(nn.Sequential):
    """``[Conv3d(3, pad 1) -> InstanceNorm3d(affine) -> LeakyReLU] x n``."""

    def __init__(
        self, in_channels: int, out_channels: int, n: int, slope: float, stride: int
    ) -> None:
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [
                nn.Conv3d(
                    in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False
                ),
                FreezableInstanceNorm3d(out_channels, stride=stride),
                nn.LeakyReLU(slope, inplace=True),
            ]
        super().__init__(*layers)


class ResidualUNet3D(nn.Module):
    """Residual 3D U-Net expert (conv-IN-LeakyReLU levels, global residual).

    Parameters
    ----------
    in_channels, out_channels:
        Image channels in and out; equal when ``residual``.
    levels:
        Resolution levels, the deepest included (4 in the paper); the input is padded to
        a multiple of ``2 ** (levels - 1)`` internally.
    initial_filters:
        Channels at the first level, doubled at every level (64 in the paper).
    convolutions_per_level:
        conv-IN-LeakyReLU units per level in the encoder and in the decoder.
    negative_slope:
        LeakyReLU slope for negative inputs, in ``[0, 1)``.
    residual:
        Return ``input + head(features)`` instead of ``head(features)``.
    zero_init_head:
        Initialise the 1x1x1 head's weight and bias to zero, so an untrained residual
        network is exactly the identity (a random head starts worse than the identity).
        Without ``residual`` this makes the untrained output zero.

    Raises
    ------
    ValueError
        For any invalid hyperparameter, naming it.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        levels: int = 4,
        initial_filters: int = 64,
        convolutions_per_level: int = 2,
        negative_slope: float = 0.01,
        residual: bool = True,
        zero_init_head: bool = True,
    ) -> None:
        super().__init__()
        cfg = _validated_config(
            in_channels=in_channels,
            out_channels=out_channels,
            levels=levels,
            initial_filters=initial_filters,
            convolutions_per_level=convolutions_per_level,
            negative_slope=negative_slope,
            residual=residual,
            zero_init_head=zero_init_head,
        )
        self.in_channels: int = cfg['in_channels']
        self.out_channels: int = cfg['out_channels']
        self.levels: int = cfg['levels']
        self.initial_filters: int = cfg['initial_filters']
        self.convolutions_per_level: int = cfg['convolutions_per_level']
        self.negative_slope: float = cfg['negative_slope']
        self.residual: bool = cfg['residual']
        self.zero_init_head: bool = cfg['zero_init_head']

        widths = [initial_filters * 2**level for level in range(levels)]
        n, slope = convolutions_per_level, self.negative_slope
        self.encoders = nn.ModuleList(
            _ConvBlock(in_channels if level == 0 else widths[level - 1], width, n, slope, 2**level)
            for level, width in enumerate(widths)
        )
        self.pool = nn.MaxPool3d(2)
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2)
            for level in range(levels - 1)
        )
        self.decoders = nn.ModuleList(
            _ConvBlock(2 * widths[level], widths[level], n, slope, 2**level)
            for level in range(levels - 1)
        )
        self.head = nn.Conv3d(widths[0], out_channels, 1)
        if zero_init_head:
            nn.init.zeros_(self.head.weight)
            if self.head.bias is not None:
                nn.init.zeros_(self.head.bias)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the network runs on without internal padding are multiples of this."""
        return 2 ** (self.levels - 1)

    def config(self) -> dict[str, Any]:
        """The hyperparameters, JSON-serialisable; ``from_config(config())`` rebuilds it."""
        return {
            'in_channels': self.in_channels,
            'out_channels': self.out_channels,
            'levels': self.levels,
            'initial_filters': self.initial_filters,
            'convolutions_per_level': self.convolutions_per_level,
            'negative_slope': self.negative_slope,
            'residual': self.residual,
            'zero_init_head': self.zero_init_head,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ResidualUNet3D:
        """Build from a :meth:`config` dict; missing keys take defaults, unknown keys fail."""
        if not isinstance(config, Mapping):
            raise ValueError(f'config must be a mapping, got {type(config).__name__}')
        return cls(**_validated_config(config))

    def norm_layers(self) -> list[FreezableInstanceNorm3d]:
        """The norm layers in execution order (the order of :class:`NormStatistics`)."""
        encoders = [m for block in self.encoders for m in block.children()]
        decoders = [m for block in reversed(self.decoders) for m in block.children()]
        return [m for m in encoders + decoders if isinstance(m, FreezableInstanceNorm3d)]

    def norm_receptive_radii(self) -> list[int]:
        """For each norm layer, a bound on how far (voxels, any axis) its input looks.

        A voxel of the layer's input depends only on network-input voxels within this
        Chebyshev distance: each 3x3x3 convolution at level ``l`` adds ``2 ** l``, each
        pooling from level ``l`` and each up-convolution to level ``l`` add ``2 ** l``
        (a safe bound; the exact reach depends on the voxel's parity).
        """
        radii: list[int] = []
        radius = 0
        for level in range(self.levels):
            for _ in range(self.convolutions_per_level):
                radius += 2**level
                radii.append(radius)
            if level < self.levels - 1:
                radius += 2**level
        for level in reversed(range(self.levels - 1)):
            radius += 2**level
            for _ in range(self.convolutions_per_level):
                radius += 2**level
                radii.append(radius)
        return radii

    @property
    def receptive_field_radius(self) -> int:
        """Bound on how far an output voxel looks: the tiling ``margin`` for exact tiles."""
        return self.norm_receptive_radii()[-1]

    @contextmanager
    def frozen_norm_statistics(self, statistics: NormStatistics) -> Iterator[None]:
        """Within the block, normalise with ``statistics`` instead of per-input statistics.

        Use it around tiled inference so every tile is normalised like the whole volume.
        Statistics are per channel, shared by all samples of a batch: one volume at a time,
        and one thread at a time per network instance (the state lives on the layers).
        """
        norms = self.norm_layers()
        if len(statistics.layers) != len(norms):
            raise ValueError(
                f'statistics has {len(statistics.layers)} layers, network has {len(norms)}'
            )
        for norm, (mean, var) in zip(norms, statistics.layers, strict=True):
            if mean.shape != (norm.num_features,) or var.shape != (norm.num_features,):
                raise ValueError(
                    f'statistics shape {tuple(mean.shape)} does not match a norm layer '
                    f'with {norm.num_features} channels'
                )
        previous = [norm._frozen for norm in norms]
        try:
            for norm, pair in zip(norms, statistics.layers, strict=True):
                norm._frozen = pair
            yield
        finally:
            for norm, old in zip(norms, previous, strict=True):
                norm._frozen = old

    def with_folded_norms(self, statistics: NormStatistics) -> ResidualUNet3D:
        """A copy whose convolutions absorb the norm layers frozen to ``statistics``.

        With frozen statistics each norm layer is a per-channel affine map, so it can be
        folded into the convolution before it; the copy has no norm layers left and
        computes the same function as the original inside
        :meth:`frozen_norm_statistics` (to float rounding), with one pass less over
        every feature map. The copy is in eval mode, on the original's device.
        """
        folded = copy.deepcopy(self).eval()
        norms = folded.norm_layers()
        if len(statistics.layers) != len(norms):
            raise ValueError(
                f'statistics has {len(statistics.layers)} layers, network has {len(norms)}'
            )
        pairs = dict(zip(norms, statistics.layers, strict=True))
        with torch.no_grad():
            for block in [*folded.encoders, *folded.decoders]:
                for index, layer in enumerate(list(block)):
                    if not isinstance(layer, FreezableInstanceNorm3d):
                        continue
                    conv = block[index - 1]
                    mean, var = (t.to(conv.weight.device, torch.float64) for t in pairs[layer])
                    scale = layer.weight.double() / torch.sqrt(var + layer.eps)
                    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
                    new_conv = nn.Conv3d(
                        conv.in_channels, conv.out_channels, conv.kernel_size,
                        padding=conv.padding, bias=True,
                    ).to(conv.weight.device)  # fmt: skip
                    new_conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1, 1))
                    new_conv.bias.copy_((bias - mean) * scale + layer.bias.double())
                    block[index - 1] = new_conv
                    block[index] = nn.Identity()
        return folded

    def forward(self, x: Tensor) -> Tensor:
        """Restore ``x`` of shape ``(B, in_channels, X, Y, Z)``; any spatial size works."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'expected input of shape (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}'
            )
        size = x.shape[2:]
        h = _pad_high(x, self.size_multiple)
        skips: list[Tensor] = []
        for encoder in self.encoders[:-1]:
            h = encoder(h)
            skips.append(h)
            h = self.pool(h)
        h = self.encoders[-1](h)
        for upsample, decoder in zip(
            reversed(self.upsamplers), reversed(self.decoders), strict=True
        ):
            h = decoder(torch.cat((skips.pop(), upsample(h)), dim=1))
        out = self.head(h)[:, :, : size[0], : size[1], : size[2]]
        return x + out if self.residual else out


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (only those requiring grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


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
    cfg = _validated_config(config.config() if isinstance(config, ResidualUNet3D) else config)
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
    padded = _pad_high(volume, m)
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
        recorder = _StatisticsRecorder()
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
            recorder = _StatisticsRecorder(target=norm, stop=True)
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
    norms: Sequence[FreezableInstanceNorm3d], recorder: _StatisticsRecorder | None
) -> None:
    for norm in norms:
        norm._recorder = recorder
