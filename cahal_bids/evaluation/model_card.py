"""Model cards: what a shipped zoo is, how it was trained, how well it did, whose data it used.

The card is rendered from the zoo's manifest and a ``cahal-eval`` run (its
``cases.json`` and ``tables.md``), so every figure in it is a measured one and the
commands that produced it are printed beside it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cahal_bids.core.atomic import write_text_atomic

__all__ = ['render_model_card', 'write_model_card']


def _mean_by_method(cases: Sequence[Mapping[str, Any]], metric: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for case in cases:
        if math.isfinite(case[metric]):
            values.setdefault(case['method'], []).append(case[metric])
    return {method: float(np.mean(found)) for method, found in values.items()}


def _augmentation_line(training: dict[str, Any]) -> str:
    """The training record's augmentations, in words (those a run did not use are left out)."""
    blur = training.get('ground_truth_blur') or 0
    contrast = training.get('contrast_augmentation') or 0
    head = training.get('head_coverage_augmentation') or 0
    line = '- augmentation: gain, gamma, bias field, flips'
    if blur:
        line += (
            f', ground-truth blur (Gaussian, sigma up to {blur} voxel per axis, half of the crops)'
        )
    if contrast:
        line += (
            f', contrast remapping (a random monotonic or non-monotonic intensity curve, '
            f'{contrast:.0%} of the crops)'
        )
    if head:
        line += f', head coverage (skull-stripped with the brain mask, {head:.0%} of the crops)'
    if training.get('contrasts'):
        line += f'; ground truths of {", ".join(training["contrasts"])} only'
    return line


def _expert_origins(experts: Mapping[str, Any]) -> str:
    """Where each expert started and how many steps it took, grouped, from provenance."""
    origins: dict[str, list[str]] = {}
    steps: dict[str, list[str]] = {}
    precisions: dict[str, list[str]] = {}
    for cell, entry in experts.items():
        provenance = entry.get('provenance') or {}
        origin = str(provenance.get('initialised_from', 'not recorded'))
        if origin.startswith('expert ') and origin.endswith('(curriculum parent)'):
            origin = 'the curriculum parent as fine-tuned just before in the same run'
        elif origin.endswith(f' expert {cell}'):
            origin = f'the same cell of {origin[: -len(f" expert {cell}")]}'
        origins.setdefault(origin, []).append(cell)
        steps.setdefault(str(provenance.get('steps', '?')), []).append(cell)
        if 'precision' in provenance:
            precisions.setdefault(_precision_text(provenance['precision']), []).append(cell)
    started = '; '.join(f'{", ".join(cells)} from {origin}' for origin, cells in origins.items())
    counted = _grouped(steps)
    precision = f'; training precision: {_grouped(precisions)}' if precisions else ''
    return f'started: {started}; steps per expert: {counted}{precision} (manifest provenance)'


def _grouped(groups: Mapping[str, list[str]]) -> str:
    """``'a (V1A3, V2A3), b (V2A2)'``, or just ``'a'`` when every cell shares it."""
    return ', '.join(
        f'{value} ({", ".join(cells)})' if len(groups) > 1 else value
        for value, cells in groups.items()
    )


def _precision_text(record: Any) -> str:
    """``'bf16'``, or ``'38 fp32 + 362 bf16 steps'`` for a run resumed in another one."""
    if isinstance(record, Mapping):
        return ' + '.join(f'{count} {name}' for name, count in record.items()) + ' steps'
    return str(record)


def _norm_statistics_sentence(entry: Mapping[str, Any] | None) -> str:
    if entry is None or entry.get('method') != 'patch-mean':
        return (
            'Instance-norm statistics at inference: those of the whole 1 mm volume (no '
            '`norm_statistics` entry in the manifest).'
        )
    return (
        "Instance-norm statistics at inference: as in training, the mean of each layer's "
        f'per-patch statistics over {entry["patches"]} patches of {entry["patch_size"]}^3 '
        f'voxels centred in the head (seed {entry["seed"]}), frozen for the whole volume '
        '(`norm_statistics` in the manifest).'
    )


def _axis_order_sentence(entry: object) -> str:
    if entry == 'thickest-last':
        return (
            'Axis order: the experts see the thickest low-resolution axis last, in training '
            'and at inference (the volume is reordered from the header and put back; '
            '`axis_order: thickest-last` in the manifest), so each restores one through-plane '
            'direction.'
        )
    return (
        'Axis order: as acquired (no `axis_order` entry in the manifest); the experts were '
        'trained with the slice direction drawn along any axis.'
    )


def render_model_card(
    manifest: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    tables: str,
    *,
    commands: Sequence[str],
    data_credits: Sequence[str],
    notes: Sequence[str] = (),
    lesions: str = '',
    real_lesions: str = '',
    ablations: str = '',
    split: str = '',
    selection: str = '',
    registration: Sequence[tuple[str, str]] = (),
) -> str:
    """Markdown model card for a zoo ``manifest`` validated by ``evaluation`` (cases.json).

    ``lesions``, ``real_lesions`` and ``ablations`` are Markdown tables (``cahal-eval``'s
    ``lesions.md`` and ``real_lesions.md``, and a measured ablation table) shown in their
    own sections when given; ``split`` is the ``split.md`` of a ``cahal-eval --routes`` run
    (every validation image, per image and per cell) and ``selection`` says which images
    chose between models. ``registration`` pairs a caption with the ``registration.md`` of a
    ``cahal-eval --registration`` run (TRE against the ground truth's registration).
    """
    training = manifest.get('training', {})
    experts = manifest.get('experts', {})
    cases = evaluation.get('cases', [])
    lines = [
        f'# Model card: {manifest["name"]} {manifest["version"]} ({manifest["modality"]})',
        '',
        '## What it is',
        '',
        f'A CAHAL expert zoo for {manifest["modality"]} images: {len(experts)} residual 3D '
        'U-Net experts, one per cell of the routing grid (voxel volume x anisotropy), each '
        'adding a correction to the trilinear resampling of a low-resolution image onto its '
        'native 1 mm grid. Architecture: '
        f'`{json.dumps(manifest.get("architecture", {}).get("config", {}), sort_keys=True)}`'
        + (
            f', {training["parameters_per_expert"]:,} parameters per expert.'
            if 'parameters_per_expert' in training
            else '.'
        ),
        '',
        _norm_statistics_sentence(manifest.get('norm_statistics')),
        '',
        _axis_order_sentence(manifest.get('axis_order')),
        '',
        'Intended use: thick-slice or low-resolution clinical brain MRI of the modality above, '
        "to obtain a 1 mm image in the patient's native space for visual reading and for "
        'downstream segmentation. It is not a diagnostic device; it restores detail that the '
        'training data taught it to expect and can miss or soften what it has not seen.',
        '',
        '## Training',
        '',
    ]
    if training:
        if training.get('init_zoo'):
            how = (
                'each from the same cell of an existing zoo'
                if training.get('init_from') == 'same-cell'
                else 'along the curriculum'
            )
            schedule = f'- experts: fine-tuned {how} (no generalist); ' + _expert_origins(experts)
        else:
            schedule = (
                f'- generalist: {training.get("generalist_steps")} steps (warm start: '
                f'{training.get("warm_start") or "none"}), then each expert '
                f'{training.get("steps_per_expert")} steps along the curriculum'
            )
        parts = training.get('merged_from', [])
        if parts:
            labels = {entry['zoo'] for entry in parts}
            merged = [
                (f'{entry["zoo"]}: ' if len(labels) > 1 else '') + ', '.join(entry['cells'])
                for entry in parts
            ]
            schedule += (
                f'; trained in {len(parts)} runs whose experts `cahal-train merge` '
                f'combined ({"; ".join(merged)})'
            )
        lines += [
            f'- data: {len(training.get("data", []))} prepared volumes (see the credits below)',
            schedule,
            _augmentation_line(training),
            f'- patches {training.get("patch_size")}^3, batch {training.get("batch_size")}, '
            + (
                f'learning rate {training.get("fine_tune_learning_rate")}'
                if training.get('init_zoo')
                else f'learning rate {training.get("learning_rate")} '
                f'({training.get("lr_schedule")}), fine-tuning '
                f'{training.get("fine_tune_learning_rate")}'
            ),
            f'- loss: edge-weighted MAE + {training.get("fft_weight")} x Fourier'
            + (
                f' + {training.get("seg_weight")} x (1 - Dice) of the frozen segmenter'
                if training.get('seg_weight')
                else ' (no semantic term: the segmenter was not used)'
            ),
            f'- hardware: {training.get("device")} ({training.get("hardware")}, '
            f'{training.get("torch_threads")} threads), '
            f'{training.get("training_seconds", 0) / 3600:.1f} h of training in total',
            '',
        ]
    else:
        lines += ['The manifest carries no training record.', '']
    means = _mean_by_method(cases, 'psnr')
    lines += [
        '## Validation',
        '',
        f'Inputs: {", ".join(Path(p).name for p in evaluation.get("inputs", []))}; '
        f'{evaluation.get("realizations")} simulated acquisition(s) per cell (seed '
        f"{evaluation.get('seed')}), degraded with the project's physics model; PSNR inside "
        'the head mask. Mean PSNR over all cases: '
        + ', '.join(f'{method} {value:.2f} dB' for method, value in means.items())
        + '.',
        '',
        tables.strip(),
        '',
    ]
    if selection:
        lines += [f'Model selection: {selection.strip()}', '']
    if split:
        lines += [
            '### Every validation image',
            '',
            'Each route on every image of the validation split, its own contrast and the '
            'others (cross-contrast stress), from one `cahal-eval --routes` run: the mean gain '
            'over the cells of each image, then every cell.',
            '',
            split.strip(),
            '',
        ]
    if registration:
        lines += [
            '### Registration accuracy (TRE)',
            '',
            "Each method's estimate and the ground truth registered to the template as "
            '`cahal-bids` registers them; the target registration error (mean distance over '
            "the template's brain, mm) of each against the ground truth's registration.",
            '',
        ]
        for caption, table in registration:
            lines += [f'{caption.strip()}:', '', table.strip(), '']
    if lesions:
        lines += [
            '### Lesion preservation',
            '',
            'Synthetic ellipsoid lesions (2.5-4 mm radii, +60 % and -40 % contrast, 3 places '
            'each) inserted into the validation ground truth, degraded in the thick-slice '
            'cells and restored: the fraction of the lesion-to-background contrast and of the '
            'thresholded lesion volume each method keeps (1.00 = as in the ground truth; '
            'above 1 the lesion grew).',
            '',
            lesions.strip(),
            '',
        ]
    if real_lesions:
        lines += [
            '### Real lesions',
            '',
            'Hyperintense lesions of the validation ground truth itself, found by a fixed '
            'threshold (brain median + 3 robust standard deviations, components of at least '
            '20 voxels), degraded in the thick-slice cells and restored; same measures as '
            'above.',
            '',
            real_lesions.strip(),
            '',
        ]
    if ablations:
        lines += ['### Ablations', '', ablations.strip(), '']
    lines += [
        'Reproduce:',
        '',
        '```bash',
        *commands,
        '```',
        '',
    ]
    if notes:
        lines += ['## Limitations', '', *[f'- {note}' for note in notes], '']
    lines += ['## Data credits', '', *[f'- {credit}' for credit in data_credits], '']
    return '\n'.join(lines)


def write_model_card(
    zoo_dir: str | os.PathLike[str],
    evaluation_dir: str | os.PathLike[str],
    *,
    commands: Sequence[str],
    data_credits: Sequence[str],
    notes: Sequence[str] = (),
    ablations: str = '',
    split_dir: str | os.PathLike[str] | None = None,
    selection: str = '',
    registration_dirs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``MODEL_CARD.md`` into ``zoo_dir`` from its manifest and an evaluation folder
    (and the folder of a ``cahal-eval --routes`` run over the validation split, and those of
    ``cahal-eval --registration`` runs, each captioned with its inputs and zoo)."""
    zoo = Path(zoo_dir)
    registration = []
    for folder in map(Path, registration_dirs):
        run = json.loads((folder / 'cases.json').read_text())
        images = ', '.join(Path(p).name.split('.')[0] for p in run.get('inputs', []))
        zoo_name = (run.get('zoo') or {}).get('name', 'the zoo')
        caption = f'{images} (restored by {zoo_name})'
        registration.append((caption, (folder / 'registration.md').read_text()))
    evaluation = Path(evaluation_dir)
    split = '' if split_dir is None else (Path(split_dir) / 'split.md').read_text()
    lesions = evaluation / 'lesions.md'
    real_lesions = evaluation / 'real_lesions.md'
    card = render_model_card(
        json.loads((zoo / 'manifest.json').read_text()),
        json.loads((evaluation / 'cases.json').read_text()),
        (evaluation / 'tables.md').read_text(),
        commands=commands,
        data_credits=data_credits,
        notes=notes,
        lesions=lesions.read_text() if lesions.is_file() else '',
        real_lesions=real_lesions.read_text() if real_lesions.is_file() else '',
        ablations=ablations,
        split=split,
        selection=selection,
        registration=registration,
    )
    return write_text_atomic(zoo / 'MODEL_CARD.md', card)
