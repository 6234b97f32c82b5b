"""Training losses of the CAHAL experts: edge-weighted L1, spectral L1 and semantic Dice.

The full objective for a prediction ``pred`` (ŷ) of a ground truth ``target`` (y) is

``L = L_WMAE(y, ŷ) + fft_weight * L_FFT(y, ŷ) + seg_weight * L_seg(y, ŷ)``

with the defaults ``fft_weight = 2e-6`` and ``seg_weight = 0.1``
(:class:`CahalLoss`). Every tensor is batched as ``(B, C, X, Y, Z)`` and every term
is differentiable with respect to ``pred``.

Edge-weighted L1 (:class:`EdgeWeightedL1`)
    Voxel-wise absolute error multiplied by ``1 + W(y)``, where the edge map ``W``
    (:func:`edge_weight_map`) is the log-compressed magnitude of the 7-point
    Laplacian of the ground truth, divided by its per-volume maximum: 0 on flat
    regions, just under 1 on the sharpest edge. ``W`` is computed from the target
    alone, without gradient.

Spectral L1 (:class:`FourierLoss`)
    ``L_FFT = sum_k |F(ŷ)_k - F(y)_k|`` over all 3D frequencies ``k`` of each
    volume, averaged over batch and channels, where ``F`` is the *unitary* DFT
    (``torch.fft.fftn(..., norm='ortho')``). It is always evaluated in float32
    (float64 inputs stay float64), autocast disabled. See :class:`FourierLoss` for
    why this normalisation, and for measured magnitudes.

Semantic Dice (:class:`SemanticLoss`, :func:`semantic_loss`)
    ``1 - mean soft Dice`` over the foreground classes between ``S(y)`` and ``S(ŷ)``
    for a frozen tissue segmenter ``S`` (see :mod:`cahal_bids.engine.segmenter`): ``S(y)``
    is computed without gradient; gradients reach ``ŷ`` through ``S(ŷ)`` while
    ``S``'s own parameters stay frozen.

>>> y = torch.zeros(1, 1, 8, 8, 8)
>>> y[..., 4:] = 1.0
>>> loss = CahalLoss()
>>> total, terms = loss(y + 0.1, y)
>>> sorted(terms)
['fft', 'total', 'wmae']
>>> round(terms['wmae'], 4)  # 0.1 * (1 + 2/8 * ln 2 / (ln 2 + 1e-6))
0.125
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cahal_bids.engine.networks import freeze

__all__ = [
    'CahalLoss',
    'EdgeWeightedL1',
    'FourierLoss',
    'SemanticLoss',
    'SoftDiceLoss',
    'edge_weight_map',
    'fourier_l1',
    'laplacian_3d',
    'laplacian_kernel_3d',
    'semantic_loss',
    'soft_dice',
]

SegmenterOutputs = Literal['logits', 'probabilities']


def _check_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'{name} must be a number, got {value!r}')
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f'{name} must be finite and >= 0, got {value!r}')
    return float(value)


def _check_positive(name: str, value: object) -> float:
    number = _check_non_negative(name, value)
    if number <= 0:
        raise ValueError(f'{name} must be > 0, got {value!r}')
    return number


def _check_volume(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f'{name} must be a torch.Tensor, got {type(x).__name__}')
    if x.ndim != 5:
        raise ValueError(f'{name} must have shape (B, C, X, Y, Z), got {tuple(x.shape)}')
    if not x.dtype.is_floating_point:
        raise ValueError(f'{name} must be floating point, got {x.dtype}')
    return x


def _check_pair(pred: object, target: object) -> tuple[Tensor, Tensor]:
    pred = _check_volume('pred', pred)
    target = _check_volume('target', target)
    if pred.shape != target.shape:
        raise ValueError(
            f'pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}'
        )
    return pred, target


def _working_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _no_autocast(x: Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


# --------------------------------------------------------------------------------------
# Edge-weighted L1
# --------------------------------------------------------------------------------------


def laplacian_kernel_3d(
    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """The discrete 3D 7-point Laplacian, shape ``(3, 3, 3)``: -6 at the centre, +1 per face.

    >>> k = laplacian_kernel_3d()
    >>> float(k.sum()), float(k[1, 1, 1]), int((k != 0).sum())
    (0.0, -6.0, 7)
    """
    kernel = torch.zeros(3, 3, 3, dtype=dtype, device=device)
    kernel[1, 1, 1] = -6.0
    for axis in range(3):
        for side in (0, 2):
            index = [1, 1, 1]
            index[axis] = side
            kernel[tuple(index)] = 1.0
    return kernel


def laplacian_3d(volume: Tensor) -> Tensor:
    """7-point Laplacian of every channel of ``volume`` ``(B, C, X, Y, Z)``, same shape.

    Borders are replicate-padded, so the volume continues flat beyond its edges and
    the field-of-view boundary is not mistaken for an anatomical edge.

    >>> ramp = torch.arange(5.0).reshape(1, 1, 5, 1, 1).expand(1, 1, 5, 4, 4)
    >>> laplacian_3d(ramp)[0, 0, :, 0, 0].tolist()  # zero inside, not at the clamped ends
    [1.0, 0.0, 0.0, 0.0, -1.0]
    """
    volume = _check_volume('volume', volume)
    padded = F.pad(volume, (1, 1, 1, 1, 1, 1), mode='replicate')
    x, y, z = volume.shape[2:]
    # Sum of (neighbour - centre) over the 6 faces: the kernel of laplacian_kernel_3d,
    # written as differences so that flat regions give exactly 0 in floating point
    # (a convolution's rounding noise there would be blown up by the normalisation).
    result = torch.zeros_like(volume)
    for dx, dy, dz in ((0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)):
        result = result + (padded[:, :, dx : dx + x, dy : dy + y, dz : dz + z] - volume)
    return result


def edge_weight_map(target: Tensor, gamma: float = 1.0, eps: float = 1e-6) -> Tensor:
    """Normalised edge map ``W(y)`` of the ground truth, values in ``[0, 1)``, no gradient.

    ``W = ln(1 + gamma * |lap(y)|) / (max ln(1 + gamma * |lap(y)|) + eps)``, the
    maximum taken over each volume (each sample and channel) separately; a constant
    volume gets ``W = 0``. Computed in float32 (float64 stays float64) with autocast
    disabled, whatever the input dtype; returned in that working dtype.

    >>> y = torch.zeros(1, 1, 6, 3, 3)
    >>> y[:, :, 3:] = 1.0
    >>> [round(v, 3) for v in edge_weight_map(y)[0, 0, :, 1, 1].tolist()]
    [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """
    target = _check_volume('target', target)
    gamma = _check_positive('gamma', gamma)
    eps = _check_positive('eps', eps)
    with torch.no_grad(), _no_autocast(target):
        y = target.detach().to(_working_dtype(target))
        compressed = torch.log1p(gamma * laplacian_3d(y).abs())
        peak = compressed.amax(dim=(2, 3, 4), keepdim=True)
        return compressed / (peak + eps)


class EdgeWeightedL1(nn.Module):
    """``mean((1 + W(y)) * |y - ŷ|)``: an L1 loss that counts edge voxels up to twice.

    Computed in float32 (float64 stays float64) with autocast disabled.

    Parameters
    ----------
    gamma:
        Gain applied to the Laplacian magnitude before ``ln(1 + .)``; with intensities
        normalised to about [0, 1] and ``gamma = 1`` the compression is mild.
    eps:
        Added to the per-volume maximum, so flat volumes give ``W = 0``.

    On a constant target it equals the mean absolute error:

    >>> y = torch.full((2, 1, 4, 4, 4), 0.5)
    >>> float(EdgeWeightedL1()(y + 0.25, y))
    0.25
    """

    def __init__(self, gamma: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = _check_positive('gamma', gamma)
        self.eps = _check_positive('eps', eps)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        pred, target = _check_pair(pred, target)
        weights = edge_weight_map(target, self.gamma, self.eps)
        with _no_autocast(pred):
            dtype = weights.dtype
            error = (pred.to(dtype) - target.to(dtype)).abs()
            return ((1.0 + weights) * error).mean()

    def extra_repr(self) -> str:
        return f'gamma={self.gamma}, eps={self.eps}'


# --------------------------------------------------------------------------------------
# Spectral L1
# --------------------------------------------------------------------------------------


def fourier_l1(pred: Tensor, target: Tensor) -> Tensor:
    """``sum_k |F(ŷ)_k - F(y)_k|`` with the unitary 3D DFT, averaged over batch and channels.

    Always computed in float32 (float64 stays float64) with autocast disabled. By
    linearity ``F(ŷ) - F(y) = F(ŷ - y)``, so one real FFT of the difference is taken
    and the half spectrum is summed with Hermitian multiplicities, which equals the
    sum over the full spectrum.

    >>> x = torch.zeros(1, 1, 4, 4, 4)
    >>> x[0, 0, 0, 0, 0] = 8.0  # a unit impulse has a flat spectrum of 1 / sqrt(N) ...
    >>> float(fourier_l1(x, torch.zeros_like(x)))  # ... summed over N = 64 frequencies
    64.0
    """
    pred, target = _check_pair(pred, target)
    dtype = torch.promote_types(_working_dtype(pred), _working_dtype(target))
    with _no_autocast(pred):
        difference = pred.to(dtype) - target.to(dtype)
        spectrum = torch.fft.rfftn(difference, dim=(-3, -2, -1), norm='ortho')
        magnitude = spectrum.abs()
        n_last = difference.shape[-1]
        multiplicity = torch.full(
            (magnitude.shape[-1],), 2.0, dtype=magnitude.dtype, device=magnitude.device
        )
        multiplicity[0] = 1.0  # the zero frequency has no mirror
        if n_last % 2 == 0:
            multiplicity[-1] = 1.0  # nor has the Nyquist frequency of an even axis
        per_volume = (magnitude * multiplicity).sum(dim=(-3, -2, -1))
        return per_volume.mean()


class FourierLoss(nn.Module):
    """Spectral L1 distance :func:`fourier_l1`, always computed in float32.

    Definition: for each volume, ``L_FFT = sum_k |F(ŷ)_k - F(y)_k|`` over all 3D
    frequencies ``k``, ``F`` the unitary DFT (``norm='ortho'``); averaged over batch
    and channels. It is zero only for identical inputs, symmetric, and its gradient
    with respect to ``ŷ`` flows through the FFT.

    Why this normalisation. The paper weights this term by ``2e-6`` "to balance its
    magnitude" with the edge-weighted L1. Measured on a smooth random field
    (Gaussian-filtered noise, sigma 3 voxels, rescaled to [0, 1]) degraded by
    ``cahal_bids.physics.degradation.degrade`` to 1x1x4 mm and back, ratio ``2e-6 * L_FFT /
    L_WMAE`` for three normalisations (second value: a 4-tissue piecewise-constant
    phantom, same degradation):

    ==========================================  =============  =============
    L_FFT definition                            64^3           96^3
    ==========================================  =============  =============
    mean_k abs(ΔF), ``norm='backward'``         2e-4 / 4e-4    4e-4 / 8e-4
    sum_k abs(ΔF), ``norm='backward'``          55 / 110       320 / 670
    **sum_k abs(ΔF), ``norm='ortho'`` (used)**  0.11 / 0.21    0.34 / 0.71
    ==========================================  =============  =============

    For instance at 96^3, smooth field: ``L_WMAE = 0.0131`` and
    ``2e-6 * L_FFT = 0.0045`` (``L_FFT = 2.2e3``). The unnormalised mean makes the
    spectral term negligible (a few 1e-4 of the total) and the unnormalised sum
    makes it dominate; the unitary sum keeps it of the same order as, and smaller
    than, the spatial term at the 64^3-96^3 patches the experts are trained on.
    Being a sum over frequencies, ``L_FFT`` grows roughly in proportion to the
    number of voxels for a given per-voxel error (x3.1 from 64^3 to 96^3 above):
    scale ``fft_weight`` by ``96**3 / N`` when training on much larger or smaller
    patches. ``tests/test_losses.py`` pins this balance.

    >>> y = torch.rand(2, 1, 6, 5, 4)
    >>> loss = FourierLoss()
    >>> float(loss(y, y))
    0.0
    >>> bool(torch.isclose(loss(y, 1 - y), loss(1 - y, y)))
    True
    """

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return fourier_l1(pred, target)


# --------------------------------------------------------------------------------------
# Semantic Dice
# --------------------------------------------------------------------------------------


def soft_dice(first: Tensor, second: Tensor, smooth: float = 1e-5) -> Tensor:
    """Soft Dice per sample and class between two probability maps ``(B, K, X, Y, Z)``.

    ``(2 sum(p q) + smooth) / (sum(p^2) + sum(q^2) + smooth)``, shape ``(B, K)``.
    The squared denominator makes ``soft_dice(p, p) == 1`` for soft maps too; a
    class absent from both maps scores 1, disjoint maps score about 0.

    >>> p = torch.zeros(1, 2, 2, 2, 2)
    >>> p[:, 0, 0], p[:, 1, 1] = 1.0, 1.0
    >>> soft_dice(p, p).tolist(), soft_dice(p, p.flip(1)).round(decimals=4).tolist()
    ([[1.0, 1.0]], [[0.0, 0.0]])
    """
    if first.shape != second.shape or first.ndim < 3:
        raise ValueError(
            'soft_dice needs two maps of the same shape (B, K, ...), got '
            f'{tuple(first.shape)} and {tuple(second.shape)}'
        )
    smooth = _check_positive('smooth', smooth)
    axes = tuple(range(2, first.ndim))
    overlap = (first * second).sum(dim=axes)
    total = (first * first).sum(dim=axes) + (second * second).sum(dim=axes)
    return (2.0 * overlap + smooth) / (total + smooth)


def semantic_loss(
    seg_true_probs: Tensor,
    seg_pred_probs: Tensor,
    *,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> Tensor:
    """``1 - mean soft Dice`` over classes (class 0, background, excluded by default).

    Both maps are class probabilities ``(B, K, X, Y, Z)``; the mean runs over samples
    and classes. Computed in float32 (float64 stays float64) with autocast disabled.
    """
    seg_true_probs = _check_volume('seg_true_probs', seg_true_probs)
    seg_pred_probs = _check_volume('seg_pred_probs', seg_pred_probs)
    start = 0 if include_background else 1
    if seg_true_probs.shape[1] <= start:
        raise ValueError(
            f'need at least {start + 1} classes, got {seg_true_probs.shape[1]} '
            f'(include_background={include_background})'
        )
    dtype = torch.promote_types(_working_dtype(seg_true_probs), _working_dtype(seg_pred_probs))
    with _no_autocast(seg_pred_probs):
        dice = soft_dice(
            seg_true_probs[:, start:].to(dtype), seg_pred_probs[:, start:].to(dtype), smooth
        )
        return 1.0 - dice.mean()


class SoftDiceLoss(nn.Module):
    """Module form of :func:`semantic_loss` on two probability maps.

    >>> p = torch.softmax(torch.randn(1, 4, 5, 5, 5), dim=1)
    >>> float(SoftDiceLoss()(p, p))
    0.0
    """

    def __init__(self, include_background: bool = False, smooth: float = 1e-5) -> None:
        super().__init__()
        if not isinstance(include_background, bool):
            raise ValueError(
                f'include_background must be True or False, got {include_background!r}'
            )
        self.include_background = include_background
        self.smooth = _check_positive('smooth', smooth)

    def forward(self, seg_true_probs: Tensor, seg_pred_probs: Tensor) -> Tensor:
        return semantic_loss(
            seg_true_probs,
            seg_pred_probs,
            include_background=self.include_background,
            smooth=self.smooth,
        )


class SemanticLoss(nn.Module):
    """``1 - Dice(S(y), S(ŷ))`` through a frozen segmenter ``S``.

    Parameters
    ----------
    segmenter:
        Maps ``(B, C, X, Y, Z)`` images to ``(B, K, X, Y, Z)`` class scores. It is
        frozen in place (:func:`~cahal_bids.engine.networks.freeze`) and stays in eval
        mode even when this module (or a parent) is switched to training mode.
    segmenter_outputs:
        ``'logits'`` (a softmax over classes is applied here, as for
        :class:`cahal_bids.engine.segmenter.TissueSegmenter` called without
        ``probabilities=True``) or ``'probabilities'``.
    include_background, smooth:
        As in :func:`semantic_loss`.
    """

    def __init__(
        self,
        segmenter: nn.Module,
        *,
        segmenter_outputs: SegmenterOutputs = 'logits',
        include_background: bool = False,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        if not isinstance(segmenter, nn.Module):
            raise ValueError(f'segmenter must be an nn.Module, got {type(segmenter).__name__}')
        if segmenter_outputs not in ('logits', 'probabilities'):
            raise ValueError(
                f"segmenter_outputs must be 'logits' or 'probabilities', got {segmenter_outputs!r}"
            )
        self.segmenter = freeze(segmenter)
        self.segmenter_outputs = segmenter_outputs
        self.dice = SoftDiceLoss(include_background, smooth)

    def train(self, mode: bool = True) -> SemanticLoss:
        super().train(mode)
        self.segmenter.eval()  # the segmenter is frozen: always in eval mode
        return self

    def _probabilities(self, x: Tensor) -> Tensor:
        scores = self.segmenter(x)
        if self.segmenter_outputs == 'logits':
            with _no_autocast(scores):
                return torch.softmax(scores.to(_working_dtype(scores)), dim=1)
        return scores

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        pred, target = _check_pair(pred, target)
        with torch.no_grad():
            true_probs = self._probabilities(target)
        return self.dice(true_probs, self._probabilities(pred))


# --------------------------------------------------------------------------------------
# The full objective
# --------------------------------------------------------------------------------------


class CahalLoss(nn.Module):
    """``L_WMAE + fft_weight * L_FFT + seg_weight * L_seg``, each optional term switchable.

    Parameters
    ----------
    fft_weight:
        Weight of :class:`FourierLoss`; 0 switches the term off (not computed).
    segmenter:
        Frozen tissue segmenter for :class:`SemanticLoss`; ``None`` switches the term off.
        It is frozen in place.
    seg_weight:
        Weight of the semantic term; 0 or ``None`` switches it off even with a segmenter.
    gamma, eps:
        Edge-map parameters of :class:`EdgeWeightedL1`.
    segmenter_outputs, include_background:
        As in :class:`SemanticLoss`.

    ``forward(pred, target)`` returns ``(total, terms)``: the differentiable total and
    a dict of detached Python floats for logging, holding the *unweighted* value of
    every active term (``'wmae'``, ``'fft'``, ``'seg'``) and ``'total'``.
    """

    def __init__(
        self,
        *,
        fft_weight: float = 2e-6,
        segmenter: nn.Module | None = None,
        seg_weight: float | None = 0.1,
        gamma: float = 1.0,
        eps: float = 1e-6,
        segmenter_outputs: SegmenterOutputs = 'logits',
        include_background: bool = False,
    ) -> None:
        super().__init__()
        self.fft_weight = _check_non_negative('fft_weight', fft_weight)
        self.seg_weight = (
            0.0 if seg_weight is None else _check_non_negative('seg_weight', seg_weight)
        )
        self.wmae = EdgeWeightedL1(gamma, eps)
        self.fft = FourierLoss() if self.fft_weight > 0 else None
        self.seg: SemanticLoss | None = None
        if segmenter is not None and self.seg_weight > 0:
            self.seg = SemanticLoss(
                segmenter,
                segmenter_outputs=segmenter_outputs,
                include_background=include_background,
            )

    @property
    def active_terms(self) -> tuple[str, ...]:
        """Names of the terms this loss computes, e.g. ``('wmae', 'fft')``."""
        names = ['wmae']
        if self.fft is not None:
            names.append('fft')
        if self.seg is not None:
            names.append('seg')
        return tuple(names)

    def weights(self) -> Mapping[str, float]:
        """Weight of every active term (``wmae`` has weight 1)."""
        table = {'wmae': 1.0, 'fft': self.fft_weight, 'seg': self.seg_weight}
        return {name: table[name] for name in self.active_terms}

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        pred, target = _check_pair(pred, target)
        values = {'wmae': self.wmae(pred, target)}
        if self.fft is not None:
            values['fft'] = self.fft(pred, target)
        if self.seg is not None:
            values['seg'] = self.seg(pred, target)
        weights = self.weights()
        total = values['wmae']
        for name in self.active_terms[1:]:
            total = total + weights[name] * values[name]
        terms = {name: float(value.detach()) for name, value in values.items()}
        terms['total'] = float(total.detach())
        return total, terms

    def extra_repr(self) -> str:
        return f'fft_weight={self.fft_weight}, seg_weight={self.seg_weight}'
