"""Every route on every image of a split: per-image and per-cell tables of PSNR gains.

A route's own contrast shows how well it serves its images; the other contrasts are the
cross-contrast stress test (a FLAIR route that breaks on full-head T1w or T2w images will
break on full-head FLAIRs, for which no ground truth exists). Gains are CAHAL's PSNR minus
trilinear's and minus cubic B-spline's, in dB, from the mean over the realizations of each
cell; a cell is *below* a reference when that mean gain is negative.

>>> rows = [
...     {'subject': 'a', 'cell': 'V1A1', 'method': m, 'psnr': p}
...     for m, p in (('trilinear', 30.0), ('cubic', 31.0), ('cahal', 32.5))
... ]
>>> summary = split_summary({'T1w': rows}, {'a': 'T1w'})
>>> summary[0]['gain_over_cubic_db'], summary[0]['cells_below_trilinear']
(1.5, 0)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ['cell_gains', 'split_summary', 'split_tables']

REFERENCES = ('trilinear', 'cubic')


def cell_gains(
    rows: Iterable[Mapping[str, Any]], *, method: str = 'cahal'
) -> list[dict[str, Any]]:
    """Per image and cell: the mean PSNR of ``method`` minus each reference's, in dB."""
    psnr: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get('psnr') is not None:
            psnr[(row['subject'], row['cell'])][row['method']].append(float(row['psnr']))
    found = []
    for (subject, cell), by_method in sorted(psnr.items()):
        if method not in by_method or any(ref not in by_method for ref in REFERENCES):
            continue
        mean = {name: float(np.mean(values)) for name, values in by_method.items()}
        found.append(
            {
                'subject': subject,
                'cell': cell,
                'psnr_db': round(mean[method], 3),
                **{
                    f'gain_over_{ref}_db': round(mean[method] - mean[ref], 3) for ref in REFERENCES
                },
            }
        )
    return found


def split_summary(
    results: Mapping[str, Iterable[Mapping[str, Any]]],
    contrasts: Mapping[str, str],
    *,
    method: str = 'cahal',
) -> list[dict[str, Any]]:
    """One row per route and image: mean gains over the cells, cells below each reference.

    ``results`` maps a route to its evaluation rows (``cases.json``'s ``cases``);
    ``contrasts`` maps each image (the rows' ``subject``) to its contrast, which decides
    whether the row is the route's own contrast or a cross-contrast stress test.
    """
    summary = []
    for route, rows in results.items():
        by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for gain in cell_gains(rows, method=method):
            by_subject[gain['subject']].append(gain)
        for subject, gains in sorted(by_subject.items()):
            contrast = contrasts.get(subject, '?')
            entry: dict[str, Any] = {
                'route': route,
                'image': subject,
                'contrast': contrast,
                'kind': 'own' if contrast == route else 'cross-contrast',
                'cells': len(gains),
            }
            for ref in REFERENCES:
                values = [gain[f'gain_over_{ref}_db'] for gain in gains]
                entry[f'gain_over_{ref}_db'] = round(float(np.mean(values)), 3)
                entry[f'cells_below_{ref}'] = int(sum(value < 0 for value in values))
            summary.append(entry)
    return summary


def split_tables(
    results: Mapping[str, Iterable[Mapping[str, Any]]],
    contrasts: Mapping[str, str],
    *,
    method: str = 'cahal',
) -> str:
    """Markdown: the per-image summary, then each route's gains per image and cell.

    Routes given the very same rows (one zoo serving several routes, evaluated once) share
    one per-cell table.
    """
    shared: dict[int, list[str]] = {}
    for route, rows in results.items():
        shared.setdefault(id(rows), []).append(route)
    results = {route: list(rows) for route, rows in results.items()}
    lines = [
        '| route | image | contrast | kind | cells | gain over trilinear (dB) | '
        'gain over cubic (dB) | cells below trilinear | cells below cubic |',
        '| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |',
    ]
    for row in split_summary(results, contrasts, method=method):
        lines.append(
            f'| {row["route"]} | {row["image"]} | {row["contrast"]} | {row["kind"]} | '
            f'{row["cells"]} | {row["gain_over_trilinear_db"]:+.2f} | '
            f'{row["gain_over_cubic_db"]:+.2f} | {row["cells_below_trilinear"]} | '
            f'{row["cells_below_cubic"]} |'
        )
    for routes in shared.values():
        route = routes[0]
        gains = cell_gains(results[route], method=method)
        subjects = sorted({gain['subject'] for gain in gains})
        cells = sorted({gain['cell'] for gain in gains})
        lookup = {(gain['subject'], gain['cell']): gain for gain in gains}
        lines += [
            '',
            f'Route{"s" if len(routes) > 1 else ""} {", ".join(routes)}'
            f'{" (one zoo)" if len(routes) > 1 else ""}: gain over trilinear / over cubic '
            '(dB) per cell; **bold** below trilinear.',
            '',
            '| cell | ' + ' | '.join(subjects) + ' |',
            '| --- |' + ' ---: |' * len(subjects),
        ]
        for cell in cells:
            values = []
            for subject in subjects:
                gain = lookup.get((subject, cell))
                if gain is None:
                    values.append('')
                    continue
                text = f'{gain["gain_over_trilinear_db"]:+.2f} / {gain["gain_over_cubic_db"]:+.2f}'
                values.append(f'**{text}**' if gain['gain_over_trilinear_db'] < 0 else text)
            lines.append(f'| {cell} | ' + ' | '.join(values) + ' |')
    return '\n'.join(lines) + '\n'
