"""Figures and an HTML page for a ``cahal-eval`` run (from its cases, no images needed).

- ``psnr_by_volume.png``: mean PSNR per volume bin, one line per anisotropy bin, for
  CAHAL (solid) and the trilinear reference (dashed), as in the paper's figure of PSNR
  against voxel volume;
- ``gain_by_cell.png``: the 7 x 3 grid of cells coloured by CAHAL's mean PSNR gain over
  the reference (infeasible cells left blank);
- ``examples.png`` (when the run kept example slices): for the cells where CAHAL gains
  least and most over the reference, one slice through the thick axis of the ground
  truth, the reference, cubic B-spline, CAHAL (and any other method), with CAHAL's
  absolute error below;
- ``report.html``: the tables and the figures, linked relatively.
"""

from __future__ import annotations

import html
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cahal_bids.core.atomic import atomic_path, write_text_atomic
from cahal_bids.core.routing import ANISOTROPY_BINS, VOLUME_BINS

__all__ = ['extreme_cells', 'gain_grid', 'write_evaluation_report']

_ANISOTROPY_LABELS = [f'A{i} ({low:g}-{high:g}]' for i, (low, high) in
                      enumerate(ANISOTROPY_BINS, start=1)]  # fmt: skip
_VOLUME_LABELS = [
    f'{low:g}-{high:g}' if math.isfinite(high) else f'>={low:g}' for low, high in VOLUME_BINS
]


def _means(cases: Sequence[Mapping[str, Any]], method: str) -> dict[tuple[int, int], float]:
    values: dict[tuple[int, int], list[float]] = defaultdict(list)
    for case in cases:
        if case['method'] == method and math.isfinite(case['psnr']):
            values[(int(case['volume_bin']), int(case['anisotropy_bin']))].append(case['psnr'])
    return {key: float(np.mean(found)) for key, found in values.items()}


def gain_grid(
    cases: Sequence[Mapping[str, Any]], method: str = 'cahal', reference: str = 'trilinear'
) -> np.ndarray:
    """Mean PSNR gain of ``method`` over ``reference`` as a (volume bin, anisotropy bin)
    array; NaN where a cell has no case (infeasible or not evaluated)."""
    grid = np.full((len(VOLUME_BINS), len(ANISOTROPY_BINS)), np.nan)
    ours, theirs = _means(cases, method), _means(cases, reference)
    for (volume, anisotropy), value in ours.items():
        if (volume, anisotropy) in theirs:
            grid[volume - 1, anisotropy - 1] = value - theirs[(volume, anisotropy)]
    return grid


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format='png', dpi=110, bbox_inches='tight')
    return path


def _psnr_figure(cases: Sequence[Mapping[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    colours = ['#d95f02', '#7570b3', '#1b9e77']
    bins = np.arange(1, len(VOLUME_BINS) + 1)
    for method, style in (('cahal', '-'), ('trilinear', '--')):
        means = _means(cases, method)
        for anisotropy, colour in enumerate(colours, start=1):
            values = [means.get((int(v), anisotropy), np.nan) for v in bins]
            if np.all(np.isnan(values)):
                continue
            axis.plot(bins, values, style, marker='o', color=colour,
                      label=f'{method} {_ANISOTROPY_LABELS[anisotropy - 1]}')  # fmt: skip
    axis.set_xticks(bins, _VOLUME_LABELS)
    axis.set_xlabel('voxel volume bin (mm$^3$)')
    axis.set_ylabel('PSNR in the head (dB)')
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    _save(figure, path)
    plt.close(figure)
    return path


def _gain_figure(cases: Sequence[Mapping[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    grid = gain_grid(cases)
    limit = float(np.nanmax(np.abs(grid))) if np.any(np.isfinite(grid)) else 1.0
    figure, axis = plt.subplots(figsize=(4.2, 5))
    image = axis.imshow(grid, cmap='RdBu', vmin=-limit, vmax=limit, aspect='auto')
    for (row, column), value in np.ndenumerate(grid):
        if np.isfinite(value):
            axis.text(column, row, f'{value:+.2f}', ha='center', va='center', fontsize=8)
    axis.set_xticks(range(len(ANISOTROPY_BINS)), [f'A{i}' for i in range(1, 4)])
    axis.set_yticks(range(len(VOLUME_BINS)), [f'V{i} {label}' for i, label in
                                             enumerate(_VOLUME_LABELS, start=1)])  # fmt: skip
    axis.set_title('CAHAL - trilinear, mean PSNR (dB)', fontsize=9)
    figure.colorbar(image, ax=axis, shrink=0.7)
    _save(figure, path)
    plt.close(figure)
    return path


def extreme_cells(
    cases: Sequence[Mapping[str, Any]], method: str = 'cahal', reference: str = 'trilinear'
) -> tuple[str, str] | None:
    """(worst, best) cell by mean PSNR gain of ``method`` over ``reference``."""
    gains: dict[str, list[float]] = defaultdict(list)
    for sign, name in ((1.0, method), (-1.0, reference)):
        per_cell: dict[str, list[float]] = defaultdict(list)
        for case in cases:
            if case['method'] == name and math.isfinite(case['psnr']):
                per_cell[case['cell']].append(case['psnr'])
        for cell, values in per_cell.items():
            gains[cell].append(sign * float(np.mean(values)))
    complete = {cell: sum(pair) for cell, pair in gains.items() if len(pair) == 2}
    if not complete:
        return None
    ordered = sorted(complete, key=complete.__getitem__)
    return ordered[0], ordered[-1]


def _examples_figure(
    cases: Sequence[Mapping[str, Any]], slices_dir: Path, path: Path
) -> Path | None:
    chosen = extreme_cells(cases)
    if chosen is None:
        return None
    panels = []
    for label, cell in zip(('least gain', 'most gain'), chosen, strict=True):
        file = slices_dir / f'{cell}_slices.npz'
        if not file.exists():
            return None
        with np.load(file) as archive:
            panels.append((label, cell, {key: archive[key] for key in archive.files}))
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = [k for k in panels[0][2] if k != 'axis']
    columns = len(names)
    figure, axes = plt.subplots(4, columns, figsize=(2.2 * columns, 9.2), squeeze=False)
    for row, (label, cell, slices) in enumerate(panels):
        truth = slices['truth']
        high = float(np.percentile(truth, 99.5)) or 1.0
        for column, name in enumerate(names):
            axis = axes[2 * row, column]
            axis.imshow(np.rot90(slices[name]), cmap='gray', vmin=0, vmax=high)
            axis.set_title(f'{cell} ({label})\n{name}' if column == 0 else name, fontsize=8)
            axis.axis('off')
            error_axis = axes[2 * row + 1, column]
            if name == 'truth':
                error_axis.axis('off')
                error_axis.text(
                    0.5, 0.5, '|estimate - truth|\n(x4 contrast)', ha='center', va='center',
                    fontsize=8, transform=error_axis.transAxes,
                )  # fmt: skip
                continue
            error_axis.imshow(
                np.rot90(np.abs(slices[name] - truth)), cmap='magma', vmin=0, vmax=high / 4
            )
            error_axis.axis('off')
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
    return path


def _markdown_table_to_html(text: str) -> str:
    blocks, rows = [], []
    for line in [*text.splitlines(), '']:
        if line.startswith('|'):
            cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
            if not all(set(cell) <= set('-: ') for cell in cells):
                rows.append(cells)
            continue
        if rows:
            head = ''.join(f'<th>{html.escape(c)}</th>' for c in rows[0])
            body = ''.join(
                '<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in row) + '</tr>'
                for row in rows[1:]
            )
            blocks.append(f'<table><tr>{head}</tr>{body}</table>')
            rows = []
    return ''.join(blocks)


def write_evaluation_report(
    out_dir: str | os.PathLike[str],
    cases: Sequence[Mapping[str, Any]],
    *,
    tables: str,
    title: str,
    slices_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the figures and ``report.html`` into ``out_dir``; returns the page.

    ``slices_dir`` holds ``<cell>_slices.npz`` files of example slices (as written by
    ``cahal-eval``); without them the example figure is left out.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    psnr = _psnr_figure(cases, folder / 'psnr_by_volume.png')
    gain = _gain_figure(cases, folder / 'gain_by_cell.png')
    examples = (
        _examples_figure(cases, Path(slices_dir), folder / 'examples.png')
        if slices_dir is not None
        else None
    )
    examples_html = (
        f'<h2>Example slices</h2><img src="{examples.name}" alt="example slices of the cells '
        'with the least and the most gain">'
        if examples is not None
        else ''
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{html.escape(title)}</title><style>'
        'body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}'
        'table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;'
        'padding:.2em .5em;text-align:right}img{max-width:100%}</style></head><body>'
        f'<h1>{html.escape(title)}</h1>'
        f'<p>{len(cases)} cases. PSNR inside the head mask, mean ± standard deviation; '
        'p-values: Mann-Whitney U, two-sided, Bonferroni-corrected, against trilinear.</p>'
        f'<img src="{psnr.name}" alt="PSNR by volume bin"><img src="{gain.name}" '
        f'alt="gain by cell">{_markdown_table_to_html(tables)}{examples_html}</body></html>\n'
    )
    return write_text_atomic(folder / 'report.html', page)
