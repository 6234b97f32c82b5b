"""Visual reports: figures of each image and the HTML pages that tie them together.

Figures are PNG files drawn with matplotlib (Agg, no display needed); pages link
them relatively, so an output folder can be moved or copied as a whole.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cahal_bids.app.group import registration_path, registration_sidecar
from cahal_bids.core.atomic import atomic_path, write_text_atomic

__all__ = [
    'comparison_figure',
    'markdown_to_html',
    'registration_figure',
    'write_group_report',
    'write_subject_report',
]


def _ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    from cahal_bids.core.orientation import Reorientation

    return Reorientation.from_affine(affine, data.shape[:3]).to_ras(
        np.ascontiguousarray(data, dtype=np.float32)
    )


def _planes(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices through ``centre`` (RAS array), display-ready."""
    x, y, z = (int(c) for c in centre)
    return [volume[x, :, :].T, volume[:, y, :].T, volume[:, :, z].T]


def _centre(volume: np.ndarray) -> tuple[int, int, int]:
    """The intensity-weighted centre of the bright half of the volume (a head's middle)."""
    weights = np.where(volume > np.percentile(volume, 50), volume, 0)
    total = float(weights.sum())
    if total <= 0:
        return tuple(int(n // 2) for n in volume.shape)  # type: ignore[return-value]
    grids = np.indices(volume.shape, sparse=True)
    return tuple(  # type: ignore[return-value]
        int(round(float((weights * grid).sum()) / total)) for grid in grids
    )


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format='png', dpi=90, bbox_inches='tight', facecolor='black')
    return path


def comparison_figure(
    input_file: str | os.PathLike[str],
    enhanced_file: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
) -> Path:
    """Input (trilinear on the 1 mm native grid), CAHAL output and their difference.

    Three planes each, at the same intensity window; the difference (output minus
    trilinear input) is what the expert changed, shown with a symmetric colour map.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from cahal_bids.core.grid import resample_image_to_native_grid
    from cahal_bids.core.nifti import load_image

    source = load_image(input_file)
    enhanced = load_image(enhanced_file)
    if enhanced.shape != source.shape or not np.allclose(enhanced.affine, source.affine):
        upsampled, grid = resample_image_to_native_grid(source.data, source.affine)
        reference_affine = grid.affine
    else:  # skipped (already 1 mm or finer): same grid
        upsampled, reference_affine = source.data, source.affine
    reference = _ras(np.asarray(upsampled), reference_affine)
    output = _ras(enhanced.data, enhanced.affine)
    if reference.shape != output.shape:
        raise ValueError(
            f'{enhanced_file}: grid {output.shape} differs from the input native grid '
            f'{reference.shape}'
        )
    low, high = np.percentile(output, [1, 99.5])
    difference = output - reference
    limit = float(np.percentile(np.abs(difference), 99.9)) or 1.0
    centre = _centre(output)
    rows = [
        ('input (trilinear, 1 mm)', _planes(reference, centre), 'gray', (low, high)),
        ('CAHAL', _planes(output, centre), 'gray', (low, high)),
        ('CAHAL - input', _planes(difference, centre), 'RdBu_r', (-limit, limit)),
    ]
    figure, axes = plt.subplots(3, 3, figsize=(9, 9), facecolor='black')
    for row, (title, planes, colormap, (vmin, vmax)) in enumerate(rows):
        for column, plane in enumerate(planes):
            axis = axes[row, column]
            axis.imshow(
                plane, cmap=colormap, vmin=vmin, vmax=vmax, origin='lower', interpolation='nearest'
            )
            axis.set_axis_off()
        axes[row, 0].set_title(title, color='white', loc='left', fontsize=10)
    figure.subplots_adjust(wspace=0.02, hspace=0.1)
    path = _save(figure, Path(out_file))
    plt.close(figure)
    return path


def registration_figure(
    moving_file: str | os.PathLike[str],
    template_file: str | os.PathLike[str],
    transform_file: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
) -> Path:
    """The registered image in template space with the template's edges drawn over it."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import nibabel as nib
    from scipy import ndimage

    from cahal_bids.preprocessing.registration import apply_to_template

    warped, affine = apply_to_template(moving_file, template_file, transform_file)
    template = nib.load(str(template_file))
    template_data = np.asarray(template.dataobj, dtype=np.float32).reshape(warped.shape)
    warped_ras = _ras(warped, affine)
    template_ras = _ras(template_data, affine)
    smooth = ndimage.gaussian_filter(template_ras, 1.0)
    gradient = np.sqrt(sum(ndimage.sobel(smooth, axis=a) ** 2 for a in range(3)))
    edges = gradient > np.percentile(gradient, 92)
    centre = tuple(n // 2 for n in warped_ras.shape)
    low, high = np.percentile(warped_ras, [1, 99.5])
    figure, axes = plt.subplots(1, 3, figsize=(10, 4), facecolor='black')
    for axis, plane, edge in zip(
        axes, _planes(warped_ras, centre), _planes(edges.astype(np.float32), centre), strict=True
    ):
        axis.imshow(plane, cmap='gray', vmin=low, vmax=high, origin='lower')
        axis.contour(edge, levels=[0.5], colors='#ff4040', linewidths=0.5, origin='lower')
        axis.set_axis_off()
    path = _save(figure, Path(out_file))
    plt.close(figure)
    return path


def _registration_table(xfm: Path) -> str:
    """A transform's table: how it was obtained and, to a template, whether to trust it."""
    info = _read_json(xfm).get('Registration', {})
    rows: list[tuple[str, Any]] = [
        ('transform', xfm.name[: -len('.json')] + '.txt'),
        ('stages', ' then '.join(info.get('stages', []))),
    ]
    quality = info.get('quality')
    flag = ''
    if quality:
        doubtful = bool(quality.get('doubtful'))
        rows += [
            ('path', registration_path(info)),
            (
                'similarity in the template brain (NMI)',
                f'{quality.get("nmi_brain", float("nan")):.4f} (threshold '
                f'{quality.get("threshold", float("nan")):.4f}; brain in view '
                f'{100 * quality.get("brain_coverage", float("nan")):.0f} %)',
            ),
            ('registration', 'DOUBTFUL: check the figure' if doubtful else 'ok'),
        ]
        flag = (
            '<p class="error">Doubtful registration: the image is less similar to the '
            'template inside its brain than any good registration of the validation '
            'images. Check the registration figure before using the transform.</p>'
            if doubtful
            else ''
        )
    else:
        similarity = info.get('similarity', {})
        rows.append(
            (
                'correlation with the reference image (whole image)',
                f'{similarity.get("correlation", float("nan")):.3f}',
            )
        )
    rows.append(('seconds', info.get('seconds')))
    return flag + _table(rows)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1, h2, h3 { font-weight: 600; } table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td { overflow-wrap: anywhere; }
img { max-width: 100%; } .error { color: #a00; white-space: pre-wrap; }
.ok { color: #070; } .muted { color: #666; } pre { background: #f4f4f4; padding: 0.6em; }
.warning { color: #8a4b00; background: #fff3d6; font-weight: 600; }
p.warning { border-left: 4px solid #e0a000; padding: 0.4em 0.6em; }
tr.doubtful td { background: #fde2e2; }
table.wide td { white-space: nowrap; overflow-wrap: normal; }
"""

_VIEWPORT = '<meta name="viewport" content="width=device-width, initial-scale=1">'
"""Lay the page out at the window's width (laptops, tablets) instead of a zoomed-out 980 px."""


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    cells = ''.join(
        f'<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>' for k, v in rows
    )
    return f'<table>{cells}</table>'


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _route(details: Mapping[str, Any]) -> str:
    """The image's route (contrast) and, when another contrast's zoo served it, which.

    >>> _route({'route': 'T2w', 'zoo': {'modality': 'T1w'}})
    'T2w (served by the T1w zoo)'
    """
    route = details.get('route') or 'n/a'
    served_by = (details.get('zoo') or {}).get('modality')
    return route if served_by in (None, route) else f'{route} (served by the {served_by} zoo)'


def _number(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    return 'n/a' if value is None else f'{value:.4g}'


def _consistency_rows(record: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Report rows of the consistency guard's sidecar record (none for a skipped image)."""
    if not record:
        return []
    rows: list[tuple[str, Any]] = [
        (
            'consistency RMSE, CAHAL / trilinear',
            f'{_number(record, "rmse_cahal")} / {_number(record, "rmse_trilinear")} '
            f'(ratio {_number(record, "ratio")}; the output acquired again against the input, '
            'lower is more consistent)',
        )
    ]
    mode = record.get('projection')
    if mode is True or mode == 'exact':
        rows.append(
            ('projected onto the acquired data', f'yes (expert {_number(record, "rmse_expert")})')
        )
    elif mode == 'adaptive':
        rows.append(
            (
                'projected onto the acquired data',
                f'as far as the noise allows (noise {_number(record, "noise_sd")}, '
                f'{_number(record, "residual_kept")} of the residual kept; expert '
                f'{_number(record, "rmse_expert")})',
            )
        )
    return rows


def _consistency_warning(record: Mapping[str, Any]) -> str:
    """A visible paragraph when the consistency guard fired, else nothing."""
    if not record.get('warning'):
        return ''
    return (
        '<p class="warning">Consistency warning: acquired again with the point-spread '
        "function of the input's voxels, the restored image agrees less with the acquired "
        f'data than trilinear interpolation does (RMSE {_number(record, "rmse_expert")} '
        f'against {_number(record, "rmse_trilinear")}). The expert may have invented '
        'detail: check this image against its input.</p>'
    )


def markdown_to_html(text: str) -> str:
    """HTML of a Markdown text such as the methods boilerplate (raw HTML in it is escaped).

    >>> markdown_to_html('### References\\n\\n- a <b>\\n')
    '<h3>References</h3>\\n<ul>\\n<li>a &lt;b&gt;</li>\\n</ul>'
    """
    import markdown

    return markdown.markdown(html.escape(text, quote=False))


def write_subject_report(
    output_dir: str | os.PathLike[str],
    subject: str,
    *,
    crash_files: Sequence[str | os.PathLike[str]] = (),
    boilerplate: str = '',
    run_info: Mapping[str, Any] | None = None,
) -> Path:
    """``sub-<label>.html`` from the subject's derivatives, figures and crash files.

    ``boilerplate`` is the run's methods text in Markdown
    (:func:`~cahal_bids.app.boilerplate.methods_text`), shown as HTML.
    """
    root = Path(output_dir)
    subject_dir = root / f'sub-{subject}'
    sections: list[str] = []
    sidecars = sorted(
        path for path in subject_dir.rglob('*_desc-cahal_*.json') if '_space-' not in path.name
    )
    for sidecar in sidecars:
        content = _read_json(sidecar)
        details = content.get('CAHAL', {})
        image_name = sidecar.name[: -len('.json')] + '.nii.gz'
        stem = sidecar.name[: -len('.json')]
        expert = details.get('expert') or {}
        rows = [
            ('output', _relative(sidecar.with_name(image_name), root)),
            ('sources', ', '.join(content.get('Sources', []))),
            ('voxel sizes (mm)', ' x '.join(f'{v:g}' for v in details.get('voxel_sizes', []))),
            (
                'V (mm^3), A',
                f'{details.get("V", float("nan")):.3g}, {details.get("A", float("nan")):.3g}',
            ),
            (
                'cell / expert',
                'skipped (already <= 1 mm)'
                if details.get('skipped')
                else f'{details.get("cell")} / {expert.get("cell")}'
                + (' (substituted)' if expert.get('substituted') else ''),
            ),
            (
                'zoo',
                f'{details.get("zoo", {}).get("name")} {details.get("zoo", {}).get("version")}',
            ),
            ('route', _route(details)),
            *_consistency_rows(details.get('consistency') or {}),
            ('denoised', content.get('Denoised')),
            ('device', details.get('device')),
            ('enhancement seconds', details.get('seconds')),
        ]
        template_xfm = registration_sidecar(sidecar)
        stem_entities, suffix = stem.rsplit('_desc-cahal_', 1)
        registration = [template_xfm] if template_xfm is not None else []
        registration += sorted(
            sidecar.parent.glob(f'{stem_entities}_from-{suffix}_to-T1w_mode-image_xfm.json')
        )
        figures = sorted((subject_dir / 'figures').glob(f'{stem_entities}_*{suffix}.png'))
        parts = [
            f'<h3>{html.escape(stem)}</h3>',
            _consistency_warning(details.get('consistency') or {}),
            _table(rows),
        ]
        for xfm in registration:
            parts.append(_registration_table(xfm))
        for figure in figures:
            parts.append(
                f'<figure><img src="{html.escape(_relative(figure, root))}" '
                f'alt="{html.escape(figure.name)}"><figcaption class="muted">'
                f'{html.escape(figure.name)}</figcaption></figure>'
            )
        sections.append(''.join(parts))
    errors = ''
    if crash_files:
        items = []
        for crash in crash_files:
            text = Path(crash).read_text(errors='replace') if Path(crash).is_file() else ''
            items.append(
                f'<li><code>{html.escape(_relative(Path(crash), root))}</code>'
                f'<pre class="error">{html.escape(text[-3000:])}</pre></li>'
            )
        errors = f'<h2>Errors</h2><ul>{"".join(items)}</ul>'
    else:
        errors = '<h2>Errors</h2><p class="ok">No errors to report.</p>'
    info_rows = list((run_info or {}).items())
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{_VIEWPORT}'
        f'<title>cahal-bids: sub-{html.escape(subject)}</title><style>{_STYLE}</style></head>'
        f'<body><h1>cahal-bids report: sub-{html.escape(subject)}</h1>'
        f'{_table(info_rows) if info_rows else ""}'
        f'<h2>Images</h2>{"".join(sections) or "<p>No enhanced image was written.</p>"}'
        f'{errors}<h2>Methods</h2>{markdown_to_html(boilerplate)}</body></html>\n'
    )
    return write_text_atomic(root / f'sub-{subject}.html', page)


def write_group_report(
    output_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]
) -> Path:
    """``group.html``: the table of ``group_summary.tsv`` with links to subject reports."""
    root = Path(output_dir)
    columns = list(rows[0]) if rows else []
    # the TSV's column names, with spaces so that the long ones wrap in a narrow window
    head = ''.join(f'<th>{html.escape(c.replace("_", " "))}</th>' for c in columns)
    warned = sum(str(row.get('consistency_warning')) == 'True' for row in rows)
    flagged = (
        f', <span class="warning">{warned} flagged by the consistency guard</span>'
        if warned
        else ''
    )
    body = []
    for row in rows:
        cells = []
        doubtful = str(row.get('registration_doubtful')) == 'True'
        for column in columns:
            value = row[column]
            if column == 'subject':
                link = f'sub-{value}.html'
                cells.append(
                    f'<td><a href="{html.escape(link)}">{html.escape(str(value))}</a></td>'
                )
            elif column == 'consistency_warning' and str(value) == 'True':
                cells.append('<td class="warning">True</td>')
            else:
                cells.append(f'<td>{html.escape(str(value))}</td>')
        body.append(
            f'<tr class="doubtful">{"".join(cells)}</tr>'
            if doubtful
            else f'<tr>{"".join(cells)}</tr>'
        )
    doubtful_count = sum(str(row.get('registration_doubtful')) == 'True' for row in rows)
    warning = (
        f'<p class="error">{doubtful_count} doubtful registration(s), highlighted: check their '
        'registration figures in the subject reports.</p>'
        if doubtful_count
        else ''
    )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{_VIEWPORT}'
        f'<title>cahal-bids: group</title><style>{_STYLE}</style></head><body>'
        f'<h1>cahal-bids group summary</h1><p>{len(rows)} image(s){flagged}.</p>{warning}'
        f'<div style="overflow-x: auto"><table class="wide"><tr>{head}</tr>{"".join(body)}'
        '</table></div>'
        '</body></html>\n'
    )
    return write_text_atomic(root / 'group.html', page)
