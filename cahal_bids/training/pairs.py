"""An endless stream of physics-based training pairs, made on the fly.

Each pair starts from a prepared 1 mm ground-truth volume (denoised, RAS,
normalised): a random crop centred inside the head is taken with a margin,
optionally given a physically plausible intensity change (global gain, gamma, a
smooth multiplicative bias field, all applied to the underlying signal before
acquisition), a new contrast (:class:`ContrastAugmentation`), a skull-stripped
version of a full-head crop (:class:`HeadCoverageAugmentation`) and a random
effective resolution (:class:`GroundTruthBlur`), degraded
with the box point-spread function at a resolution triplet drawn by the sampler
(random slice offset included) and interpolated back to 1 mm, and finally the
margin is cut away so the patch borders carry no artefacts of the crop. Random flips
are applied to input and target together.

Every random choice comes from one ``numpy.random.Generator``, whose state can be
saved and restored, so a stream can be resumed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cahal_bids.core.axis_order import thickest_last
from cahal_bids.physics.degradation import DegradationParameters, RandomDegrade, Sampler

__all__ = [
    'ContrastAugmentation',
    'GroundTruthBlur',
    'HeadCoverageAugmentation',
    'IntensityAugmentation',
    'Pair',
    'PairBatch',
    'PairStream',
    'TrainingVolume',
    'crop_with_zeros',
]


@dataclass(frozen=True)
class TrainingVolume:
    """One prepared ground truth: image (float32, RAS, 1 mm, normalised) and head mask.

    ``brain_mask`` (optional) lets :class:`HeadCoverageAugmentation` make a
    skull-stripped version of a full-head image.
    """

    image: np.ndarray
    head_mask: np.ndarray
    name: str = ''
    brain_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape != self.head_mask.shape:
            raise ValueError(
                f'{self.name}: image {self.image.shape} and mask {self.head_mask.shape} '
                'must be 3D and of the same shape'
            )
        if not self.head_mask.any():
            raise ValueError(f'{self.name}: empty head mask')
        if self.brain_mask is not None and self.brain_mask.shape != self.image.shape:
            raise ValueError(
                f'{self.name}: brain mask {self.brain_mask.shape} and image '
                f'{self.image.shape} must have the same shape'
            )


@dataclass(frozen=True)
class IntensityAugmentation:
    """Ranges of the intensity changes applied to the ground truth before degradation."""

    gain: tuple[float, float] = (0.85, 1.15)
    gamma: tuple[float, float] = (0.75, 1.35)
    bias_amplitude: float = 0.15
    probability: float = 0.8

    def __call__(self, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.probability:
            return patch
        gain = rng.uniform(*self.gain)
        gamma = math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))
        out = gain * np.power(np.clip(patch, 0.0, None), gamma)
        if self.bias_amplitude > 0:
            out = out * _smooth_bias_field(patch.shape, self.bias_amplitude, rng)
        return out.astype(np.float32)


@dataclass(frozen=True)
class ContrastAugmentation:
    """Give the ground truth a new contrast while keeping its anatomy.

    With ``probability`` the crop's intensities pass through a random piecewise-linear
    curve: ``knots`` equally spaced points over ``[0, max_intensity]`` (intensities are
    normalised to about 1 at the head's 99.5th percentile), the curve's value at each a
    uniform draw in ``[0, 1]``, sorted with ``monotonic_probability`` (a T1w stays
    T1w-like but with other tissue ratios) and left unsorted otherwise (tissues swap
    brightness, e.g. T1w to T2w-like). Zero stays zero (air is dark in every MR contrast)
    and intensities above ``max_intensity`` continue the last segment's value. Input and
    target come from the same remapped crop, so a network learns to restore edges
    whatever tissue sits on either side, not the grey levels of the training contrasts.
    """

    probability: float = 0.5
    knots: int = 6
    max_intensity: float = 1.5
    monotonic_probability: float = 0.5

    def __post_init__(self) -> None:
        if not (0 <= self.probability <= 1):
            raise ValueError(f'probability must be in [0, 1], got {self.probability}')
        if not (0 <= self.monotonic_probability <= 1):
            raise ValueError(
                f'monotonic_probability must be in [0, 1], got {self.monotonic_probability}'
            )
        if self.knots < 2:
            raise ValueError(f'knots must be at least 2, got {self.knots}')
        if self.max_intensity <= 0:
            raise ValueError(f'max_intensity must be positive, got {self.max_intensity}')

    def __call__(self, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.probability:
            return patch
        positions = np.linspace(0.0, self.max_intensity, self.knots + 1)
        values = rng.uniform(0.0, 1.0, self.knots)
        if rng.random() < self.monotonic_probability:
            values = np.sort(values)
        values = np.concatenate([[0.0], values])
        remapped = np.interp(np.clip(patch, 0.0, None), positions, values)
        return remapped.astype(np.float32)


@dataclass(frozen=True)
class HeadCoverageAugmentation:
    """Train on skull-stripped versions of full-head images too.

    Clinical inputs come both as full-head scans and brain-extracted. With
    ``probability`` a crop whose volume has a brain mask is multiplied by that mask
    (already skull-stripped volumes are unchanged, their mask covers what is left).
    """

    probability: float = 0.3

    def __post_init__(self) -> None:
        if not (0 <= self.probability <= 1):
            raise ValueError(f'probability must be in [0, 1], got {self.probability}')

    def __call__(
        self, patch: np.ndarray, brain: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        if rng.random() >= self.probability:
            return patch
        return (patch * brain).astype(np.float32)


@dataclass(frozen=True)
class GroundTruthBlur:
    """Give the ground truth a random effective resolution before it is acquired.

    "1 mm" scans differ in how sharp they really are (scanner, sequence, vendor
    interpolation): in the training pool the high-frequency content of the sharpest
    T1w matches the softest once blurred by a Gaussian of about 0.5 voxel. Training on
    a single sharpness teaches a network to add that much detail to every image, which
    overshoots on softer ones. With ``probability`` the crop is therefore blurred by a
    Gaussian with an independent standard deviation in ``[0, max_sigma]`` voxels along
    each axis; input and target both come from the blurred crop, so the network learns
    to restore the detail the acquisition supports, not a fixed prior.
    """

    max_sigma: float = 0.6
    probability: float = 0.5

    def __post_init__(self) -> None:
        if not (0 <= self.max_sigma <= 3):
            raise ValueError(f'max_sigma must be in [0, 3] voxels, got {self.max_sigma}')
        if not (0 <= self.probability <= 1):
            raise ValueError(f'probability must be in [0, 1], got {self.probability}')

    def __call__(self, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.max_sigma == 0 or rng.random() >= self.probability:
            return patch
        from scipy.ndimage import gaussian_filter

        sigmas = [float(rng.uniform(0.0, self.max_sigma)) for _ in range(patch.ndim)]
        return gaussian_filter(patch, sigmas, mode='nearest', truncate=3.0).astype(np.float32)


def _smooth_bias_field(
    shape: Sequence[int], amplitude: float, rng: np.random.Generator
) -> np.ndarray:
    """exp of a random linear-plus-quadratic polynomial over the patch, at most ``amplitude``."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    grid = np.meshgrid(*axes, indexing='ij')
    log_field = np.zeros(tuple(shape), dtype=np.float32)
    for coordinate in grid:
        log_field += rng.uniform(-1, 1) * coordinate + rng.uniform(-1, 1) * (coordinate**2 - 1 / 3)
    peak = float(np.abs(log_field).max()) or 1.0
    return np.exp(log_field * (amplitude / peak)).astype(np.float32)


def crop_with_zeros(image: np.ndarray, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``image[origin : origin + size]``, with zeros where the box leaves the image."""
    crop = np.zeros(tuple(size), dtype=np.float32)
    source, target = [], []
    for start, length, n in zip(origin, size, image.shape, strict=True):
        lo, hi = max(start, 0), min(start + length, n)
        if hi <= lo:
            return crop
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    crop[tuple(target)] = image[tuple(source)]
    return crop


@dataclass(frozen=True)
class Pair:
    """One training pair and everything needed to make it again."""

    input: torch.Tensor
    target: torch.Tensor
    parameters: DegradationParameters
    source: str
    crop_origin: tuple[int, int, int]
    """Voxel index of the (margin-included) crop's first corner in the source volume."""
    flipped_axes: tuple[int, ...]
    axis_order: tuple[int, int, int] = (0, 1, 2)
    """Permutation applied last, after the flips (:mod:`cahal_bids.core.axis_order`)."""


@dataclass
class PairBatch:
    """A batch of training pairs and how each was made."""

    inputs: torch.Tensor
    targets: torch.Tensor
    parameters: list[DegradationParameters]
    sources: list[str] = field(default_factory=list)


class PairStream:
    """Endless batches of (degraded input, ground truth) patches.

    Parameters
    ----------
    volumes
        Prepared ground truths.
    sampler
        Draws a resolution triplet from a ``numpy.random.Generator`` (e.g.
        :class:`cahal_bids.physics.acquisition.CellSampler`).
    patch_size
        Edge of the cubic patches in voxels.
    batch_size
        Pairs per batch.
    margin
        Extra voxels degraded around each patch and then cut away; at least the
        largest slice thickness the sampler can draw (12 covers every cell).
    augmentation
        Intensity changes applied before degradation, or None.
    contrast
        Random contrast remapping (:class:`ContrastAugmentation`), or None.
    head_coverage
        Random skull stripping of volumes that have a brain mask
        (:class:`HeadCoverageAugmentation`), or None.
    blur
        Random ground-truth resolution (:class:`GroundTruthBlur`), or None.
    flips
        Random flips along each axis.
    thickest_last
        Reorder every pair's axes so that its thickest low-resolution axis comes last
        (:func:`cahal_bids.core.axis_order.thickest_last`), as inference does for zoos whose
        manifest says ``"axis_order": "thickest-last"``.
    seed
        Seed of the stream's generator.
    """

    def __init__(
        self,
        volumes: Sequence[TrainingVolume],
        sampler: Sampler,
        *,
        patch_size: int = 64,
        batch_size: int = 2,
        margin: int = 12,
        augmentation: IntensityAugmentation | None = None,
        contrast: ContrastAugmentation | None = None,
        head_coverage: HeadCoverageAugmentation | None = None,
        blur: GroundTruthBlur | None = None,
        flips: bool = True,
        thickest_last: bool = False,
        seed: int = 0,
    ) -> None:
        if not volumes:
            raise ValueError('PairStream needs at least one training volume')
        if patch_size < 8:
            raise ValueError(f'patch_size must be at least 8, got {patch_size}')
        if batch_size < 1:
            raise ValueError(f'batch_size must be at least 1, got {batch_size}')
        if margin < 0:
            raise ValueError(f'margin must be >= 0, got {margin}')
        self.volumes = list(volumes)
        self.degrade = RandomDegrade(sampler, random_offset=True)
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.margin = margin
        self.augmentation = augmentation
        self.contrast = contrast
        self.head_coverage = head_coverage
        self.blur = blur
        self.flips = flips
        self.thickest_last = thickest_last
        self.rng = np.random.default_rng(seed)
        self._mask_indices = [np.flatnonzero(v.head_mask.ravel()) for v in self.volumes]

    def state(self) -> dict[str, Any]:
        """The generator state (JSON-serialisable), for exact resumption."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state

    def _crop_origin(self, index: int) -> tuple[int, int, int]:
        size = self.patch_size + 2 * self.margin
        mask_indices = self._mask_indices[index]
        flat = mask_indices[self.rng.integers(len(mask_indices))]
        centre = np.unravel_index(flat, self.volumes[index].image.shape)
        return tuple(int(c) - size // 2 for c in centre)  # type: ignore[return-value]

    def next_pair(self) -> Pair:
        """One (input, target) pair of shape ``(1, P, P, P)`` each."""
        index = int(self.rng.integers(len(self.volumes)))
        volume = self.volumes[index]
        origin = self._crop_origin(index)
        size = (self.patch_size + 2 * self.margin,) * 3
        truth = crop_with_zeros(volume.image, origin, size)
        if self.head_coverage is not None and volume.brain_mask is not None:
            brain = crop_with_zeros(volume.brain_mask.astype(np.float32), origin, size)
            truth = self.head_coverage(truth, brain, self.rng)
        if self.contrast is not None:
            truth = self.contrast(truth, self.rng)
        if self.augmentation is not None:
            truth = self.augmentation(truth, self.rng)
        if self.blur is not None:
            truth = self.blur(truth, self.rng)
        truth_tensor = torch.from_numpy(np.ascontiguousarray(truth))
        degraded, parameters = self.degrade(truth_tensor, self.rng)
        inner = slice(self.margin, self.margin + self.patch_size)
        source = degraded[inner, inner, inner]
        target = truth_tensor[inner, inner, inner]
        axes: list[int] = []
        if self.flips:
            axes = [axis for axis in range(3) if self.rng.random() < 0.5]
            if axes:
                source, target = source.flip(axes), target.flip(axes)
        order = thickest_last(parameters.resolution) if self.thickest_last else (0, 1, 2)
        source, target = source.permute(order), target.permute(order)
        return Pair(
            input=source.contiguous()[None],
            target=target.contiguous()[None],
            parameters=parameters,
            source=self.volumes[index].name,
            crop_origin=origin,
            flipped_axes=tuple(axes),
            axis_order=order,
        )

    def __iter__(self) -> PairStream:
        return self

    def __next__(self) -> PairBatch:
        pairs = [self.next_pair() for _ in range(self.batch_size)]
        return PairBatch(
            inputs=torch.stack([p.input for p in pairs]),
            targets=torch.stack([p.target for p in pairs]),
            parameters=[p.parameters for p in pairs],
            sources=[p.source for p in pairs],
        )
