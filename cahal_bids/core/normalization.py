"""Robust intensity normalisation shared by training, evaluation and inference.

MRI intensities have no absolute unit, so every image is divided by a robust
estimate of its bright-tissue level before it meets a network, and multiplied
back afterwards. The estimate is a high percentile (99.5 by default) of the
voxels inside the head, where the head is every voxel brighter than a small
fraction (5 % by default) of the image's 99.9th percentile. No offset is
removed: zero stays zero, so background stays background, and the mapping is
exactly invertible.

>>> import numpy as np
>>> image = np.zeros((10, 10, 10), dtype=np.float32)
>>> image[2:8, 2:8, 2:8] = 400.0
>>> scaler = RobustScale.fit(image)
>>> float(scaler.scale)
400.0
>>> float(scaler.normalize(image).max())
1.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

__all__ = ['DEFAULT_NORMALIZATION', 'RobustScale', 'head_mask', 'head_threshold']

DEFAULT_NORMALIZATION: dict[str, Any] = {
    'method': 'robust-scale',
    'percentile': 99.5,
    'head_fraction': 0.05,
    'head_reference_percentile': 99.9,
}
"""Parameters recorded in every zoo manifest."""

ArrayLike = TypeVar('ArrayLike')


def head_threshold(
    image: np.ndarray, *, head_fraction: float = 0.05, reference_percentile: float = 99.9
) -> float | None:
    """``head_fraction`` times the image's high percentile; None for an empty image."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return None
    reference = float(np.percentile(finite, reference_percentile))
    if reference <= 0:
        return None
    return head_fraction * reference


def head_mask(
    image: np.ndarray, *, head_fraction: float = 0.05, reference_percentile: float = 99.9
) -> np.ndarray:
    """Voxels brighter than ``head_fraction`` times the image's high percentile."""
    threshold = head_threshold(
        image, head_fraction=head_fraction, reference_percentile=reference_percentile
    )
    if threshold is None:
        return np.zeros(image.shape, dtype=bool)
    return image > threshold


@dataclass(frozen=True)
class RobustScale:
    """Divide by a robust bright-tissue level; :meth:`denormalize` undoes it exactly."""

    scale: float
    percentile: float = 99.5
    head_fraction: float = 0.05
    head_reference_percentile: float = 99.9

    @classmethod
    def fit(
        cls,
        image: np.ndarray,
        *,
        percentile: float = 99.5,
        head_fraction: float = 0.05,
        head_reference_percentile: float = 99.9,
    ) -> RobustScale:
        """Estimate the scale of ``image``; an empty or all-zero image gets scale 1."""
        if not 0 < percentile <= 100:
            raise ValueError(f'percentile must be in (0, 100], got {percentile}')
        if not 0 <= head_fraction < 1:
            raise ValueError(f'head_fraction must be in [0, 1), got {head_fraction}')
        array = np.asarray(image)
        mask = head_mask(
            array, head_fraction=head_fraction, reference_percentile=head_reference_percentile
        )
        scale = float(np.percentile(array[mask], percentile)) if mask.any() else 1.0
        if not (np.isfinite(scale) and scale > 0):
            scale = 1.0
        return cls(
            scale=scale,
            percentile=percentile,
            head_fraction=head_fraction,
            head_reference_percentile=head_reference_percentile,
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], image: np.ndarray) -> RobustScale:
        """Fit with the parameters recorded in a zoo manifest."""
        if config.get('method') != 'robust-scale':
            raise ValueError(f'unsupported normalisation method {config.get("method")!r}')
        return cls.fit(
            image,
            percentile=float(config.get('percentile', 99.5)),
            head_fraction=float(config.get('head_fraction', 0.05)),
            head_reference_percentile=float(config.get('head_reference_percentile', 99.9)),
        )

    def normalize(self, image: ArrayLike) -> ArrayLike:
        return image / self.scale  # type: ignore[operator]

    def denormalize(self, image: ArrayLike) -> ArrayLike:
        return image * self.scale  # type: ignore[operator]

    def as_dict(self) -> dict[str, Any]:
        return {'method': 'robust-scale', **asdict(self)}
