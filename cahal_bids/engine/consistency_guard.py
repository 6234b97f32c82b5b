"""The per-image consistency guard: does the restored image still acquire as the input?

"Restore, don't hallucinate" has a check that needs no ground truth. After the expert,
the restored 1 mm image is acquired again onto the grid the input was routed on, with
the box point-spread function of its voxels
(:class:`~cahal_bids.physics.consistency.AcquiredGrid`), and compared with that input;
the trilinear reference (the expert's own input) gets the same measure. Trilinear
interpolation followed by the box PSF smooths along every thick axis, so it never
reproduces a sharp acquisition exactly; an expert that restores detail which was really
acquired brings the measure down, one that invents detail (or overshoots) pushes it up.
When the expert's output agrees less with what was acquired than trilinear interpolation
does, the guard sets ``warning``. Smoothing what was acquired (denoising along a 1 mm
axis, say) pushes the measure up too: the guard measures agreement with the data, not
realism, so a warning asks for a look at the image rather than proving an invention.

The comparison happens in the routed geometry, exactly where the trilinear reference
was computed: the normalised input in RAS order, its sub-millimetre axes area-averaged
to 1 mm (``cahal_bids.core.grid.axis_operator``), inside the normalisation's head
mask (``cahal_bids.core.normalization.head_threshold``), in units of the robust
intensity scale the image was divided by.

Optionally (:class:`~cahal_bids.engine.inference.Enhancer`'s ``consistency_projection``)
the restored image is projected onto the images that acquire exactly as the input
(:meth:`~cahal_bids.physics.consistency.AcquiredGrid.project`); the guard then still
judges the expert's own output (``rmse_expert``), since the projection removes what the
acquisition can see of an invented detail, not the detail itself.

>>> import torch
>>> from cahal_bids.core.grid import resample_to_native_grid
>>> low = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]]).repeat(2, 2, 1)  # sharp, 1 x 1 x 2 mm
>>> acquired, grid = routed_acquisition(low, (1.0, 1.0, 2.0), (2, 2, 8), (False,) * 3)
>>> exact = low.repeat_interleave(2, dim=2)  # a perfect restoration of this acquisition
>>> trilinear = resample_to_native_grid(low, (1.0, 1.0, 2.0), (2, 2, 8))
>>> _, record = consistency_guard(exact, trilinear, acquired, grid, None)
>>> record['rmse_cahal'], record['rmse_trilinear'] > 0, record['warning']
(0.0, True, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cahal_bids.physics.consistency import AcquiredGrid

if TYPE_CHECKING:
    import torch

__all__ = [
    'CONSISTENCY_MEASURE',
    'CONSISTENCY_TOLERANCE',
    'DEFAULT_PROJECTION',
    'PROJECTIONS',
    'adaptive_projection',
    'consistency_guard',
    'guard_routed',
    'inconsistency_message',
    'projection_mode',
    'project_onto_acquired',
    'routed_acquisition',
]

CONSISTENCY_TOLERANCE = 0.02
"""How much worse than trilinear (relative RMSE) the expert's output may be before the
guard warns: ``warning`` when ``rmse_expert > (1 + CONSISTENCY_TOLERANCE) * rmse_trilinear``.

An expert that leaves its input unchanged scores exactly trilinear's RMSE (ratio 1),
and the expert's arithmetic moves the ratio by far less than 2 %: bf16 rounds the
residual branch to 8 significant bits (about 0.4 % of the residual; the shipped zoos'
validation PSNR moves by 0.006 dB on average), float16 weights and the order of tiled
additions less still. A ratio above 1.02 is therefore the expert's doing, not rounding.
Measured with the zoos of 0.4.0.dev0: the T1w zoo scores 0.76 and 0.87 on
``sub-philips01`` acquired at 1 x 2 x 4 and 1 x 1 x 5 mm, 0.60 and 0.75 on real
clinical T2w and FLAIR, but 1.27 at 1 x 1 x 3 mm (cell V3A2, where it is also 0.2 dB
below trilinear in PSNR) and 1.15 to 1.37 on three real 3 mm T1w (V3A2); the FLAIR zoo
scores 1.12 to 1.38 on real FLAIRs and 2.28 on a real T1w."""

PROJECTIONS = ('off', 'adaptive', 'exact')
"""The modes of what follows the expert (nothing, the noise-adaptive projection onto the
acquired data, or the exact projection; see :func:`consistency_guard`)."""

DEFAULT_PROJECTION = 'adaptive'
"""The projection the enhancer and the CLIs use unless told otherwise.

Adaptive, because on the validation split it adds to the expert in every cell of both
T1w images, and because it holds off where the data cannot support it. With 2 % or 4 %
noise it moves PSNR by -0.01 to +0.32 dB, against a wider slice profile by -0.08 to
+0.07 dB, and on denoised inputs, aimed at the raw acquisition as ``cahal-bids`` aims
it, by +0.35 to +1.73 dB (docs/evaluation.md)."""

ABSOLUTE_FLOOR = 1e-6
"""RMSE (in units of the intensity scale) below which the output counts as exactly
consistent, whatever trilinear scores (float32 rounding of a perfect restoration)."""

CONSISTENCY_MEASURE = (
    'RMSE of the output re-acquired with the box PSF against the acquired image, in units '
    'of the robust intensity scale, inside the head'
)
"""What ``rmse_cahal`` and ``rmse_trilinear`` measure, as the sidecar says it."""


def inconsistency_message(record: dict[str, Any]) -> str | None:
    """The log and sidecar warning for a guard ``record`` that fired, else None."""
    if not record.get('warning'):
        return None
    ratio = 'n/a' if record['ratio'] is None else f'{record["ratio"]:.3g}'
    projected = record['projection'] not in (False, 'off')
    before = ', before its projection onto the acquired data,' if projected else ''
    return (
        f'the restored image{before} agrees less with the acquired data than trilinear '
        f'interpolation (re-acquisition RMSE {record["rmse_expert"]:.4g} against '
        f'{record["rmse_trilinear"]:.4g}, ratio {ratio}): the expert may have invented '
        'detail; check the image'
    )


def projection_mode(value: str | bool) -> str:
    """A projection mode checked against :data:`PROJECTIONS`; True and False mean
    ``'exact'`` and ``'off'`` (the boolean flag of earlier versions)."""
    if isinstance(value, bool):
        return 'exact' if value else 'off'
    if value not in PROJECTIONS:
        raise ValueError(f'consistency_projection must be one of {PROJECTIONS}, got {value!r}')
    return value


def routed_acquisition(
    low: torch.Tensor,
    voxel_sizes: Sequence[float],
    out_shape: Sequence[int],
    flipped: Sequence[bool],
) -> tuple[torch.Tensor, AcquiredGrid]:
    """The acquired image in the routed geometry and where it lies on the 1 mm grid.

    ``low`` (RAS order, normalised), ``voxel_sizes``, ``out_shape`` and ``flipped`` are
    what ``cahal_bids.core.grid.resample_to_native_grid`` receives for the trilinear
    reference. Sub-millimetre axes are area-averaged onto the 1 mm grid, as that function
    does before anything else meets them; the other axes keep their acquired voxels, whose
    1 mm grid starts at their outer edge (at the far end on a ``flipped`` axis, so there
    acquired voxel 0 starts ``m - n * r`` mm from the 1 mm grid's edge).
    """
    from cahal_bids.core.grid import axis_operator
    from cahal_bids.core.resampling import apply_separable

    averaging: list[Any] = []
    shape, resolution, offset = [], [], []
    for n, r, m, flip in zip(low.shape[-3:], voxel_sizes, out_shape, flipped, strict=True):
        r, m = float(r), int(m)
        if r < 1.0:
            averaging.append(axis_operator(int(n), r, m, flipped=bool(flip)))
            shape.append(m)
            resolution.append(1.0)
            offset.append(0.0)
        else:
            averaging.append(None)
            shape.append(int(n))
            resolution.append(r)
            offset.append(m - int(n) * r if flip else 0.0)
    if any(matrix is not None for matrix in averaging):
        low = apply_separable(low, averaging)
    grid = AcquiredGrid(
        shape=tuple(shape),  # type: ignore[arg-type]
        resolution=tuple(resolution),  # type: ignore[arg-type]
        fine_shape=tuple(int(m) for m in out_shape),  # type: ignore[arg-type]
        offset=tuple(offset),  # type: ignore[arg-type]
    )
    return low, grid


def guard_routed(
    restored: torch.Tensor,
    trilinear: torch.Tensor,
    low: torch.Tensor,
    routing: tuple[Sequence[float], Sequence[int], Sequence[bool]],
    head_level: float | None,
    *,
    projection: str = 'off',
    raw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`consistency_guard` for the enhancer's routed image.

    ``low`` is the expert's input (normalised, RAS order) and ``raw`` (the same, or None)
    the acquisition it was denoised from; ``routing`` holds the voxel sizes, 1 mm shape
    and flipped axes of :func:`routed_acquisition`; the head mask is the acquired voxels
    above ``head_level`` (None: every voxel).
    """
    acquired, grid = routed_acquisition(low, *routing)
    target = None if raw is None else routed_acquisition(raw, *routing)[0]
    inside = None if head_level is None else acquired > head_level
    return consistency_guard(
        restored, trilinear, acquired, grid, inside, projection=projection, target=target
    )


def _significant(value: float | None) -> float | None:
    return None if value is None else float(f'{value:.6g}')


def adaptive_projection(
    restored: torch.Tensor,
    acquired: torch.Tensor,
    grid: AcquiredGrid,
    inside: torch.Tensor | None,
) -> tuple[torch.Tensor, float | None, float | None]:
    """The ``'adaptive'`` projection: estimate the noise, then move as far as it allows.

    The noise of ``acquired`` is estimated in its flattest tissue (``inside``;
    :func:`~cahal_bids.core.noise.estimate_noise_sd`); where it cannot be (too little
    tissue) nothing moves. Returns the image, the noise level (None if unknown) and the
    fraction of the residual's energy put back (None if nothing moved).
    """
    from cahal_bids.core.noise import estimate_noise_sd

    noise_sd = estimate_noise_sd(
        acquired.detach().to('cpu').numpy(),
        grid.resolution,
        None if inside is None else inside.detach().to('cpu').numpy(),
    )
    if noise_sd is None:
        return restored, None, None
    output, kept = grid.project_adaptive(restored, acquired, noise_sd)
    return output, noise_sd, kept


def consistency_guard(
    restored: torch.Tensor,
    trilinear: torch.Tensor,
    acquired: torch.Tensor,
    grid: AcquiredGrid,
    inside: torch.Tensor | None,
    *,
    projection: str = 'off',
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Measure (and with a ``projection``, enforce) the consistency of ``restored``.

    ``restored`` (the expert's output) and ``trilinear`` (its input) are on the 1 mm
    grid, ``acquired`` and the boolean mask ``inside`` (None: every voxel) on ``grid``'s
    acquired grid, all in RAS order and normalised units; ``trilinear`` may live on
    another device. ``projection`` is one of :data:`PROJECTIONS`: ``'off'`` keeps
    ``restored``, ``'exact'`` projects it onto the images that acquire exactly as
    ``acquired`` (:meth:`~cahal_bids.physics.consistency.AcquiredGrid.project`),
    ``'adaptive'`` moves it towards them as far as the noise estimated in ``acquired``
    allows (:func:`adaptive_projection`). Returns the image to keep and the sidecar
    record: ``rmse_cahal`` (the returned image), ``rmse_expert`` (the expert's output,
    the same without projection), ``rmse_trilinear``, ``ratio`` (``rmse_expert /
    rmse_trilinear``), ``warning``, ``tolerance``, ``projection`` (the mode),
    ``noise_sd`` and ``residual_kept`` (adaptive only: the noise level used and the
    fraction of the residual's energy put back), ``projection_target`` and ``measure``.
    RMSEs are None when the head mask is empty. ``target`` (same grid as ``acquired``;
    None: ``acquired``) is what the projections aim at: the raw acquisition when
    ``acquired``, the expert's input, was denoised. Its noise is the acquisition's own,
    which the adaptive projection can estimate; a denoiser's leftover noise is correlated
    and reads far too low. The RMSEs always compare with ``acquired``.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f'projection must be one of {PROJECTIONS}, got {projection!r}')

    def on(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        return acquired.to(device, dtype), None if inside is None else inside.to(device)

    rmse_trilinear = grid.rmse(trilinear, *on(trilinear.device, trilinear.dtype))
    observed, mask = on(restored.device, restored.dtype)
    rmse_expert = grid.rmse(restored, observed, mask)
    noise_sd = kept = None
    aim = observed if target is None else target.to(restored.device, restored.dtype)
    if projection == 'exact':
        output = grid.project(restored, aim)
    elif projection == 'adaptive':
        output, noise_sd, kept = adaptive_projection(restored, aim, grid, mask)
    else:
        output = restored
    rmse_cahal = rmse_expert if output is restored else grid.rmse(output, observed, mask)
    ratio = None
    warning = False
    if rmse_expert is not None and rmse_trilinear is not None:
        if rmse_trilinear > 0:
            ratio = rmse_expert / rmse_trilinear
        warning = rmse_expert > ABSOLUTE_FLOOR and (
            rmse_expert > (1.0 + CONSISTENCY_TOLERANCE) * rmse_trilinear
        )
    record = {
        'rmse_cahal': _significant(rmse_cahal),
        'rmse_trilinear': _significant(rmse_trilinear),
        'rmse_expert': _significant(rmse_expert),
        'ratio': _significant(ratio),
        'warning': bool(warning),
        'tolerance': CONSISTENCY_TOLERANCE,
        'projection': projection,
        'noise_sd': _significant(noise_sd),
        'residual_kept': _significant(kept),
        'projection_target': 'input' if target is None else 'acquired before denoising',
        'measure': CONSISTENCY_MEASURE,
    }
    return output, record


def project_onto_acquired(
    restored: np.ndarray,
    low: np.ndarray,
    affine: np.ndarray,
    *,
    projection: str = 'exact',
    head_fraction: float = 0.05,
    reference_percentile: float = 99.9,
) -> np.ndarray:
    """The ``projection`` of :class:`~cahal_bids.engine.inference.Enhancer`, applied afterwards.

    ``restored`` is an image on the native 1 mm grid of ``low`` (whose voxel-to-world
    matrix is ``affine``), in its voxel axes, as
    :meth:`~cahal_bids.engine.inference.Enhancer.restore` returns it without projection;
    the result is what the enhancer with that ``projection`` (``'exact'`` or
    ``'adaptive'``) returns, found in the same routed geometry (for ``'adaptive'``, with
    the head mask of the enhancer's normalisation, ``head_fraction`` and
    ``reference_percentile``). Both projections commute with the intensity scale, so this
    equals projecting inside the enhancer, to float32 rounding. The evaluation protocol
    uses it, so that one expert run serves the expert alone and each projection.
    """
    import torch

    from cahal_bids.core.grid import native_grid
    from cahal_bids.core.normalization import head_threshold
    from cahal_bids.core.orientation import Reorientation

    if projection not in ('exact', 'adaptive'):
        raise ValueError(f"projection must be 'exact' or 'adaptive', got {projection!r}")
    matrix = np.asarray(affine, dtype=np.float64)
    sizes = np.sqrt(np.sum(matrix[:3, :3] ** 2, axis=0)).tolist()
    grid = native_grid(low.shape, matrix)
    if tuple(restored.shape) != grid.shape:
        raise ValueError(
            f'restored image of shape {tuple(restored.shape)} is not on the native grid '
            f'{grid.shape} of the acquired image'
        )
    reorientation = Reorientation.from_affine(matrix, low.shape)
    ras_low = reorientation.to_ras(np.ascontiguousarray(low, dtype=np.float32))
    with torch.inference_mode():
        acquired, acquired_grid = routed_acquisition(
            torch.from_numpy(ras_low),
            reorientation.sizes_to_ras(sizes),
            reorientation.sizes_to_ras(grid.shape),
            reorientation.flipped_in_ras,
        )
        estimate = torch.from_numpy(
            reorientation.to_ras(np.ascontiguousarray(restored, dtype=np.float32))
        )
        if projection == 'exact':
            projected = acquired_grid.project(estimate, acquired)
        else:
            level = head_threshold(
                ras_low, head_fraction=head_fraction, reference_percentile=reference_percentile
            )
            inside = None if level is None else acquired > level
            projected, _, _ = adaptive_projection(estimate, acquired, acquired_grid, inside)
    return np.ascontiguousarray(reorientation.from_ras(projected.numpy()), dtype=np.float32)
