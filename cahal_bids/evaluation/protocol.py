"""The evaluation protocol: every cell, several simulated acquisitions, methods side by side.

For a prepared ground truth (1 mm, RAS, normalised so its robust bright level is 1)
and each of the 18 cells, ``realizations`` resolution triplets are drawn inside the
cell (seeded, recorded), the truth is acquired with the box point-spread function
(no slice offset, so the 1 mm grids of truth and estimates coincide), and each
method restores the low-resolution image to 1 mm:

* ``trilinear``: the reference, exactly what the network receives as input;
* ``cubic``: cubic B-spline interpolation (``scipy.ndimage.map_coordinates``,
  order 3) at the same voxel centres;
* ``cahal``: the product path, :meth:`cahal_bids.engine.inference.Enhancer.restore` on the
  low-resolution array and its affine;
* ``cahal+projection`` (on request): the same restored image projected onto the images
  that acquire exactly as the low-resolution one, as ``--consistency-projection`` does
  (:func:`cahal_bids.engine.consistency_guard.project_onto_acquired`; one expert run
  serves both, so its ``seconds`` are the projection's alone).

Metrics, inside the truth's head mask: PSNR with data range ``max - min`` of the
truth in the mask, SSIM (Gaussian window, sigma 1.5 voxels, the usual constants
K1 = 0.01, K2 = 0.03 with the same data range) averaged over the mask, Pearson
correlation, and data consistency: the estimate acquired again with the same
triplet, compared with the acquired image (RMSE over low-resolution voxels at
least half inside the head, in units of the data range).

With a frozen tissue segmenter ``S`` (:mod:`cahal_bids.engine.segmenter`), each estimate is
also segmented and compared with ``S`` on the truth, inside the head mask: Dice of
CSF, grey and white matter, and the signed relative volume error of each class
((volume in the estimate - volume in the truth) / volume in the truth).
:func:`volumetric_bias` then gives each method's mean relative volume error per class
with its 95 % confidence interval.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cahal_bids.core.metrics import dice_per_class
from cahal_bids.core.routing import CELLS, VOLUME_BINS, route
from cahal_bids.physics.acquisition import sample_in_cell
from cahal_bids.physics.consistency import acquisition_rmse

if TYPE_CHECKING:
    from cahal_bids.engine.inference import Enhancer
    from cahal_bids.engine.segmenter import TissueSegmenter

__all__ = [
    'ADAPTIVE_METHOD',
    'PROJECTED_METHOD',
    'PROJECTION_METHODS',
    'UNPROJECTED_METHOD',
    'EvaluationCase',
    'acquire',
    'cahal_method',
    'cahal_methods',
    'cubic_bspline',
    'data_consistency',
    'evaluate_volume',
    'markdown_tables',
    'mean_dice',
    'pearson',
    'psnr',
    'ssim',
    'summarize',
    'tissue_measures',
    'trilinear',
    'volumetric_bias',
    'volumetric_bias_table',
]

Method = Callable[
    [np.ndarray, np.ndarray, tuple[float, float, float], tuple[int, int, int]], np.ndarray
]


class EstimatesHook(Protocol):
    """Called once per simulated acquisition with the truth and every method's estimate."""

    def __call__(
        self,
        *,
        cell: str,
        realization: int,
        resolution: tuple[float, float, float],
        truth: np.ndarray,
        estimates: dict[str, np.ndarray],
    ) -> None: ...


def acquire(
    truth: np.ndarray, affine: np.ndarray, resolution: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Low-resolution image (box PSF, no offset) and its affine, sharing the truth's corner."""
    import torch

    from cahal_bids.core.grid import low_resolution_affine
    from cahal_bids.physics.degradation import degrade

    _, low = degrade(
        torch.from_numpy(np.ascontiguousarray(truth)), resolution, return_low_resolution=True
    )
    low_affine = low_resolution_affine(affine, resolution)
    return low.numpy(), low_affine


def trilinear(
    low: np.ndarray,
    affine: np.ndarray,
    resolution: tuple[float, float, float],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """The reference: linear interpolation to the 1 mm grid (the network's input)."""
    import torch

    from cahal_bids.core.resampling import apply_separable, linear_weights

    matrices = [
        linear_weights(m, r, n, 1.0) for m, r, n in zip(low.shape, resolution, shape, strict=True)
    ]
    return apply_separable(torch.from_numpy(low).double(), matrices).float().numpy()


def cubic_bspline(
    low: np.ndarray,
    affine: np.ndarray,
    resolution: tuple[float, float, float],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Cubic B-spline interpolation at the 1 mm voxel centres (edges: nearest)."""
    from scipy.ndimage import map_coordinates

    axes = [(np.arange(n) + 0.5) / r - 0.5 for n, r in zip(shape, resolution, strict=True)]
    grid = np.meshgrid(*axes, indexing='ij')
    out = map_coordinates(low.astype(np.float64), grid, order=3, mode='nearest')
    return out.astype(np.float32)


PROJECTED_METHOD = 'cahal+projection'
"""The evaluation method of CAHAL's output projected exactly onto the acquired data."""

UNPROJECTED_METHOD = 'cahal-unprojected'
"""The evaluation method of the expert's output alone (no projection of any kind)."""

ADAPTIVE_METHOD = 'cahal+adaptive'
"""The evaluation method of the expert's output with the adaptive projection."""

PROJECTION_METHODS = {'off': UNPROJECTED_METHOD, 'exact': PROJECTED_METHOD,
                      'adaptive': ADAPTIVE_METHOD}  # fmt: skip
"""The method that names each projection when it is evaluated beside ``cahal``."""


def cahal_methods(enhancer: Enhancer, *, projections: Sequence[str] = ()) -> dict[str, Method]:
    """CAHAL as evaluation methods: route the simulated resolution, restore, crop.

    ``'cahal'`` is what ``enhancer`` returns, its ``consistency_projection`` included;
    each other mode in ``projections`` adds a method (:data:`PROJECTION_METHODS`: the
    expert alone, ``'cahal+projection'``, ``'cahal+adaptive'``). The expert runs once per
    low-resolution image, without projection; every method projects that output afterwards
    (:func:`~cahal_bids.engine.consistency_guard.project_onto_acquired`, equal to the
    enhancer's own projection to float32 rounding). Methods reuse the expert's output
    when called with the same ``low`` array (as :func:`evaluate_volume` does) and restore
    afresh otherwise.
    """
    from cahal_bids.core.normalization import RobustScale
    from cahal_bids.engine.consistency_guard import project_onto_acquired

    last: dict[str, Any] = {}

    def restore(low, affine, resolution):
        if last.get('low') is not low:
            restored, _, _ = enhancer.restore(low, affine, route(resolution), projection='off')
            last.clear()
            last.update(low=low, restored=restored, projected={})
        return last['restored']

    def method(mode: str) -> Method:
        def run(low, affine, resolution, shape):
            restored = restore(low, affine, resolution)
            if mode != 'off':
                if mode not in last['projected']:
                    scaler = RobustScale.from_config(enhancer.zoo.normalization, low)
                    last['projected'][mode] = project_onto_acquired(
                        restored,
                        low,
                        affine,
                        projection=mode,
                        head_fraction=scaler.head_fraction,
                        reference_percentile=scaler.head_reference_percentile,
                    )
                restored = last['projected'][mode]
            return restored[: shape[0], : shape[1], : shape[2]]

        return run

    methods: dict[str, Method] = {'cahal': method(enhancer.consistency_projection)}
    for mode in projections:
        if mode not in PROJECTION_METHODS:
            expected = list(PROJECTION_METHODS)
            raise ValueError(f'unknown projection {mode!r}; expected one of {expected}')
        if mode != enhancer.consistency_projection:
            methods[PROJECTION_METHODS[mode]] = method(mode)
    return methods


def cahal_method(enhancer: Enhancer) -> Method:
    """CAHAL as an evaluation method: route the simulated resolution, restore, crop."""
    return cahal_methods(enhancer)['cahal']


def psnr(truth: np.ndarray, estimate: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    error = float(np.mean((truth[mask].astype(np.float64) - estimate[mask]) ** 2))
    return math.inf if error == 0 else 10 * math.log10(data_range**2 / error)


def ssim(
    truth: np.ndarray,
    estimate: np.ndarray,
    mask: np.ndarray,
    data_range: float,
    sigma: float = 1.5,
) -> float:
    from scipy.ndimage import gaussian_filter

    x, y = truth.astype(np.float64), estimate.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = gaussian_filter(x, sigma), gaussian_filter(y, sigma)
    vx = gaussian_filter(x * x, sigma) - mx * mx
    vy = gaussian_filter(y * y, sigma) - my * my
    cxy = gaussian_filter(x * y, sigma) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index[mask].mean())


def pearson(truth: np.ndarray, estimate: np.ndarray, mask: np.ndarray) -> float:
    return float(np.corrcoef(truth[mask].astype(np.float64), estimate[mask])[0, 1])


def data_consistency(
    estimate: np.ndarray,
    low: np.ndarray,
    mask: np.ndarray,
    resolution: Sequence[float],
    data_range: float,
) -> float:
    """RMSE between the estimate acquired again and the acquired image (data-range units)."""
    return acquisition_rmse(estimate, low, resolution, data_range=data_range, mask=mask)


@dataclass(frozen=True)
class EvaluationCase:
    """One method on one simulated acquisition."""

    subject: str
    cell: str
    volume_bin: int
    anisotropy_bin: int
    realization: int
    seed: int
    resolution: tuple[float, float, float]
    method: str
    psnr: float
    ssim: float
    pearson: float
    data_consistency: float
    seconds: float
    dice: dict[str, float] | None = None
    """Dice of ``S`` on the estimate against ``S`` on the truth, per tissue class."""
    volume_error: dict[str, float] | None = None
    """Signed relative volume error per tissue class (``S`` on estimate vs on truth)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _class_names(segmenter: TissueSegmenter) -> tuple[str, ...]:
    from cahal_bids.engine.segmenter import DEFAULT_CLASS_NAMES

    names = tuple(getattr(segmenter, 'class_names', ()) or ())
    if len(names) == segmenter.n_classes:
        return names
    if segmenter.n_classes == len(DEFAULT_CLASS_NAMES):
        return DEFAULT_CLASS_NAMES
    return tuple(f'class_{index}' for index in range(segmenter.n_classes))


def tissue_measures(
    truth_labels: np.ndarray,
    estimate_labels: np.ndarray,
    mask: np.ndarray,
    class_names: Sequence[str],
) -> tuple[dict[str, float], dict[str, float]]:
    """(Dice, signed relative volume error) of each tissue class (label >= 1) in ``mask``."""
    truth_in, estimate_in = truth_labels[mask], estimate_labels[mask]
    overlap = dice_per_class(estimate_in, truth_in, len(class_names))
    dice: dict[str, float] = {}
    volume_error: dict[str, float] = {}
    for label, name in enumerate(class_names):
        truth_count = int(np.count_nonzero(truth_in == label))
        if label == 0 or truth_count == 0:
            continue
        dice[name] = overlap[label]
        volume_error[name] = (
            int(np.count_nonzero(estimate_in == label)) - truth_count
        ) / truth_count
    return dice, volume_error


def evaluate_volume(
    truth: np.ndarray,
    head_mask: np.ndarray,
    affine: np.ndarray,
    *,
    subject: str,
    enhancer: Enhancer | None,
    cells: Sequence[str] = CELLS,
    realizations: int = 3,
    seed: int = 0,
    extra_methods: dict[str, Method] | None = None,
    progress: Callable[[str], None] | None = None,
    segmenter: TissueSegmenter | None = None,
    on_estimates: EstimatesHook | None = None,
    projections: Sequence[str] = (),
) -> list[EvaluationCase]:
    """Run the protocol on one prepared ground truth; returns every case.

    Seeds depend on the cell's place in the full grid, not in ``cells``, so running
    the cells one at a time (as a resumable run does) gives the same cases.
    ``projections`` adds a method per projection mode (with an enhancer; see
    :func:`cahal_methods`).
    """
    mask = head_mask.astype(bool)
    data_range = float(truth[mask].max() - truth[mask].min())
    methods: dict[str, Method] = {'trilinear': trilinear, 'cubic': cubic_bspline}
    if enhancer is not None:
        methods.update(cahal_methods(enhancer, projections=projections))
    methods.update(extra_methods or {})
    truth_labels = None
    if segmenter is not None:
        from cahal_bids.engine.segmenter import segment_volume

        truth_labels = segment_volume(segmenter, truth)
    cases: list[EvaluationCase] = []
    shape = tuple(int(n) for n in truth.shape)
    for cell in cells:
        cell_index = CELLS.index(cell)
        for realization in range(realizations):
            case_seed = seed * 100_003 + cell_index * 101 + realization
            resolution = sample_in_cell(cell, np.random.default_rng(case_seed))
            low, low_affine = acquire(truth, affine, resolution)
            estimates: dict[str, np.ndarray] = {}
            for name, method in methods.items():
                started = time.perf_counter()
                estimate = method(low, low_affine, resolution, shape)  # type: ignore[arg-type]
                seconds = time.perf_counter() - started
                estimates[name] = estimate
                dice = volume_error = None
                if segmenter is not None and truth_labels is not None:
                    from cahal_bids.engine.segmenter import segment_volume

                    dice, volume_error = tissue_measures(
                        truth_labels,
                        segment_volume(segmenter, estimate),
                        mask,
                        _class_names(segmenter),
                    )
                cases.append(
                    EvaluationCase(
                        subject=subject,
                        cell=cell,
                        volume_bin=int(cell[1]),
                        anisotropy_bin=int(cell[3]),
                        realization=realization,
                        seed=case_seed,
                        resolution=tuple(round(r, 4) for r in resolution),  # type: ignore[arg-type]
                        method=name,
                        psnr=psnr(truth, estimate, mask, data_range),
                        ssim=ssim(truth, estimate, mask, data_range),
                        pearson=pearson(truth, estimate, mask),
                        data_consistency=data_consistency(
                            estimate, low, mask, resolution, data_range
                        ),
                        seconds=seconds,
                        dice=dice,
                        volume_error=volume_error,
                    )
                )
            if on_estimates is not None:
                on_estimates(
                    cell=cell,
                    realization=realization,
                    resolution=resolution,
                    truth=truth,
                    estimates=estimates,
                )
            if progress is not None:
                progress(f'{subject} {cell} #{realization + 1}')
    return cases


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def summarize(
    cases: Sequence[EvaluationCase], metric: str = 'psnr', reference: str = 'trilinear'
) -> dict[str, Any]:
    """Mean and std per method by volume bin, overall, and per cell; Mann-Whitney U vs reference.

    p-values are two-sided and Bonferroni-corrected over every (group, method) test.
    """
    from scipy.stats import mannwhitneyu

    methods = list(dict.fromkeys(case.method for case in cases))
    groups: dict[str, Callable[[EvaluationCase], bool]] = {
        f'V{index}': (lambda c, i=index: c.volume_bin == i)
        for index in range(1, len(VOLUME_BINS) + 1)
    }
    groups['overall'] = lambda c: True
    cells = list(dict.fromkeys(case.cell for case in cases))
    tests = (len(groups)) * max(len(methods) - 1, 1)
    table: dict[str, Any] = {'metric': metric, 'reference': reference, 'by_bin': {}, 'by_cell': {}}
    for group, member in groups.items():
        row = {}
        reference_values = [
            getattr(c, metric) for c in cases if member(c) and c.method == reference
        ]
        for method in methods:
            values = [getattr(c, metric) for c in cases if member(c) and c.method == method]
            if not values:
                continue
            mean, std = _mean_std(values)
            entry: dict[str, Any] = {'mean': mean, 'std': std, 'n': len(values)}
            if method != reference and len(reference_values) > 1 and len(values) > 1:
                p = mannwhitneyu(values, reference_values, alternative='two-sided').pvalue
                entry['p_bonferroni'] = min(1.0, float(p) * tests)
            row[method] = entry
        if row:
            table['by_bin'][group] = row
    for cell in cells:
        table['by_cell'][cell] = {
            method: _mean_std(
                [getattr(c, metric) for c in cases if c.cell == cell and c.method == method]
            )[0]
            for method in methods
        }
    return table


def markdown_tables(summary: dict[str, Any]) -> str:
    """The summary as two Markdown tables: by volume bin (with overall) and by cell."""
    bins = list(summary['by_bin'])
    methods = list(next(iter(summary['by_bin'].values())))
    metric = summary['metric'].upper() if summary['metric'] == 'psnr' else summary['metric']
    labels = {
        f'V{i}': f'{low:g}-{high:g}' if math.isfinite(high) else f'>={low:g}'
        for i, (low, high) in enumerate(VOLUME_BINS, start=1)
    }
    lines = [
        f'| {metric} | ' + ' | '.join(labels.get(b, b) for b in bins) + ' |',
        '| --- |' + ' ---: |' * len(bins),
    ]
    for method in methods:
        cells = []
        for group in bins:
            entry = summary['by_bin'][group].get(method)
            if entry is None:
                cells.append('')
                continue
            star = '*' if entry.get('p_bonferroni', 1.0) < 0.05 else ''
            cells.append(f'{entry["mean"]:.2f} ± {entry["std"]:.2f}{star}')
        lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    lines.append('| cell | ' + ' | '.join(methods) + ' | gain vs reference |')
    lines.append('| --- |' + ' ---: |' * (len(methods) + 1))
    reference = summary['reference']
    shown = 'cahal' if 'cahal' in methods else methods[-1]
    lines[-2] = lines[-2].replace('gain vs reference', f'{shown} - {reference}')
    for cell, row in summary['by_cell'].items():
        gain = row[shown] - row[reference]
        lines.append(
            f'| {cell} | ' + ' | '.join(f'{row[m]:.2f}' for m in methods) + f' | {gain:+.2f} |'
        )
    return '\n'.join(lines) + '\n'


def volumetric_bias(
    cases: Sequence[EvaluationCase] | Sequence[dict[str, Any]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean signed relative volume error per method and tissue class, with a 95 % interval.

    The interval is the Student-t interval of the mean over cases (realizations of the
    same subject are not independent, so read it as a lower bound on the uncertainty).
    Returns ``{method: {class: {'mean', 'low', 'high', 'n'}}}``; methods without tissue
    measures are left out.
    """
    from scipy.stats import t as student_t

    errors: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        record = case if isinstance(case, dict) else case.as_dict()
        if not record.get('volume_error'):
            continue
        for name, value in record['volume_error'].items():
            errors.setdefault(record['method'], {}).setdefault(name, []).append(float(value))
    result: dict[str, dict[str, dict[str, float]]] = {}
    for method, by_class in errors.items():
        for name, values in by_class.items():
            array = np.asarray(values)
            mean = float(array.mean())
            if array.size > 1:
                half = float(
                    student_t.ppf(0.975, array.size - 1)
                    * array.std(ddof=1)
                    / math.sqrt(array.size)
                )
            else:
                half = math.nan
            result.setdefault(method, {})[name] = {
                'mean': mean,
                'low': mean - half,
                'high': mean + half,
                'n': int(array.size),
            }
    return result


def volumetric_bias_table(
    bias: dict[str, dict[str, dict[str, float]]],
    dice: dict[str, dict[str, float]] | None = None,
) -> str:
    """Markdown: mean relative volume error [95 % CI] in percent per class, and mean Dice."""
    if not bias:
        return ''
    classes = list(next(iter(bias.values())))
    header = '| method | ' + ' | '.join(f'{name} volume error' for name in classes)
    if dice:
        header += ' | ' + ' | '.join(f'{name} Dice' for name in classes)
    lines = [header + ' |', '| --- |' + ' ---: |' * (len(classes) * (2 if dice else 1))]
    for method, by_class in bias.items():
        cells = [
            f'{100 * by_class[name]["mean"]:+.1f} % '
            f'[{100 * by_class[name]["low"]:+.1f}, {100 * by_class[name]["high"]:+.1f}]'
            for name in classes
        ]
        if dice:
            cells += [f'{dice.get(method, {}).get(name, math.nan):.3f}' for name in classes]
        lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def mean_dice(
    cases: Sequence[EvaluationCase] | Sequence[dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """Mean Dice per method and tissue class over the cases that have one."""
    values: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        record = case if isinstance(case, dict) else case.as_dict()
        for name, value in (record.get('dice') or {}).items():
            values.setdefault(record['method'], {}).setdefault(name, []).append(float(value))
    return {
        method: {name: float(np.mean(found)) for name, found in by_class.items()}
        for method, by_class in values.items()
    }
