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
whole volume's: :func:`~cahal_bids.engine.norm_statistics.estimate_norm_statistics`
measures them (from one whole forward, or exactly layer by layer from haloed blocks
when the volume does not fit) and
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
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cahal_bids.core.validation import check_bool, check_int
from cahal_bids.engine.padding import pad_to_multiple

if TYPE_CHECKING:
    from cahal_bids.engine.norm_statistics import NormStatistics, StatisticsRecorder

__all__ = [
    'FreezableInstanceNorm3d',
    'ResidualUNet3D',
    'count_parameters',
    'freeze',
    'validated_config',
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
        self.stride = check_int('stride', stride, 1)
        self._frozen: tuple[Tensor, Tensor] | None = None
        self._recorder: StatisticsRecorder | None = None

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


def validated_config(config: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Complete ``config`` (and keyword overrides) with defaults and validate every value."""
    given = {**(config or {}), **kwargs}
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f'unknown ResidualUNet3D config keys: {", ".join(unknown)}')
    cfg = {**_DEFAULTS, **given}
    for name in ('in_channels', 'out_channels', 'levels', 'initial_filters'):
        check_int(name, cfg[name], 1)
    check_int('convolutions_per_level', cfg['convolutions_per_level'], 1)
    slope = cfg['negative_slope']
    if (
        isinstance(slope, bool)
        or not isinstance(slope, (int, float))
        or not math.isfinite(slope)
        or not 0 <= slope < 1
    ):
        raise ValueError(f'negative_slope must be a number in [0, 1), got {slope!r}')
    cfg['negative_slope'] = float(slope)
    check_bool('residual', cfg['residual'])
    check_bool('zero_init_head', cfg['zero_init_head'])
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
        cfg = validated_config(
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
        return cls(**validated_config(config))

    def norm_layers(self) -> list[FreezableInstanceNorm3d]:
        """The norm layers in execution order.

        That is the order of
        :class:`~cahal_bids.engine.norm_statistics.NormStatistics`.
        """
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
        """How far an output voxel looks, at most (the tiling ``margin`` for exact tiles)."""
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
        h = pad_to_multiple(x, self.size_multiple, avoid_single_voxel=True)
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


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with every parameter's ``requires_grad`` off; returns it."""
    module.eval()
    module.requires_grad_(False)
    return module


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (only those requiring grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
