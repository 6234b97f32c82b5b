"""Registration accuracy in the evaluation protocol (the paper's Figure 7).

For each simulated acquisition, every method's 1 mm estimate (trilinear, cubic,
CAHAL, ...) is registered to the template exactly as the BIDS-App registers an
enhanced image (:func:`~cahal_bids.preprocessing.registration.register_to_template`:
initialisation, rigid then affine, the brain-extracted template for skull-stripped
images), and so is the ground truth, once per image. The target registration error
(TRE) of a method is the mean distance, over the template's brain voxels, between
where its transform and the ground truth's take them
(:func:`~cahal_bids.preprocessing.transforms.mean_displacement`): the error in
millimetres that the restoration adds to everything downstream that works in
template space. The truth and its estimates share one 1 mm grid, so the two
transforms map into the same space.

Whether the image is skull-stripped is decided once from the ground truth, which
is what was acquired (:func:`~cahal_bids.preprocessing.masks.looks_brain_extracted`),
so every method registers the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cahal_bids.core.nifti import save_image
from cahal_bids.core.routing import CELLS
from cahal_bids.preprocessing.registration import register_to_template
from cahal_bids.preprocessing.transforms import mask_points, mean_displacement, read_itk_affine

if TYPE_CHECKING:
    from cahal_bids.preprocessing.brain_template import TemplateBrain

__all__ = [
    'RegistrationCase',
    'RegistrationTRE',
    'registration_figure',
    'registration_hook',
    'tre_tables',
    'write_registration_results',
]

POINT_STEP = 2
"""Every second template brain voxel along each axis (the mean moves by < 0.01 mm)."""

REGISTRATION_PROTOCOL = 1
"""Version of this protocol; part of every fingerprint, so a change re-registers."""


@dataclass(frozen=True)
class RegistrationCase:
    """One method's registration on one simulated acquisition, against the ground truth's."""

    subject: str
    cell: str
    realization: int
    resolution: tuple[float, float, float]
    method: str
    tre_mm: float
    nmi_brain: float
    doubtful: bool
    brain_extracted: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RegistrationTRE:
    """An estimates hook of :func:`~cahal_bids.evaluation.protocol.evaluate_volume`: TRE.

    ``truth_affine`` is the 1 mm grid of the truth (and of every estimate). The
    ground truth is registered on the first call (or taken from ``reference``, the
    record a previous run saved), then each estimate in ``methods`` (default: all)
    on every call. ``cases`` collects :class:`RegistrationCase` rows.
    """

    def __init__(
        self,
        *,
        subject: str,
        template: TemplateBrain,
        truth_affine: np.ndarray,
        modality: str,
        brain_extracted: bool,
        seed: int = 0,
        sloppy: bool = False,
        methods: Sequence[str] | None = None,
        reference: Mapping[str, Any] | None = None,
        progress: Callable[[str], None] | None = None,
        truth_sha256: str = '',
    ) -> None:
        self.subject = subject
        self.template = template
        self.affine = np.asarray(truth_affine, dtype=np.float64)
        self.modality = modality
        self.brain_extracted = brain_extracted
        self.seed = seed
        self.sloppy = sloppy
        self.methods = None if methods is None else tuple(methods)
        self.reference: dict[str, Any] | None = dict(reference) if reference else None
        self.progress = progress
        self.points = mask_points(template.brain_mask, step=POINT_STEP)
        self.cases: list[RegistrationCase] = []
        self.reference_path: Path | None = None
        self.fingerprint = hashlib.sha256(
            json.dumps(
                {
                    'protocol': REGISTRATION_PROTOCOL,
                    'template': [
                        template.name,
                        template.record.get('head_sha256'),
                        template.record.get('brain_mask_sha256'),
                    ],
                    'truth': [truth_sha256, self.affine.tolist()],
                    'modality': modality,
                    'brain_extracted': bool(brain_extracted),
                    'seed': seed,
                    'sloppy': sloppy,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()
        """What makes saved registrations of this truth reusable."""

    def _register(self, data: np.ndarray, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix='cahal-eval-reg-') as scratch:
            image = save_image(data, self.affine, Path(scratch) / f'{name}.nii.gz')
            result = register_to_template(
                image,
                self.template,
                forward_path=Path(scratch) / 'forward.txt',
                inverse_path=Path(scratch) / 'inverse.txt',
                modality=self.modality,
                brain_extracted=self.brain_extracted,
                sloppy=self.sloppy,
                seed=self.seed,
            )
            matrix = read_itk_affine(result.forward)
        return matrix, result.as_dict()

    def truth_reference(self, truth: np.ndarray) -> dict[str, Any]:
        """The ground truth's registration: its matrix (LPS, 4 x 4) and record."""
        if self.reference is None:
            matrix, record = self._register(truth, 'truth')
            record.pop('forward', None)
            record.pop('inverse', None)
            self.reference = {'matrix': matrix.tolist(), 'record': record}
        return self.reference

    def __call__(
        self,
        *,
        cell: str,
        realization: int,
        resolution: tuple[float, float, float],
        truth: np.ndarray,
        estimates: dict[str, np.ndarray],
    ) -> None:
        reference = np.asarray(self.truth_reference(truth)['matrix'])
        for method, estimate in estimates.items():
            if self.methods is not None and method not in self.methods:
                continue
            matrix, record = self._register(estimate, method)
            quality = record.get('quality', {})
            self.cases.append(
                RegistrationCase(
                    subject=self.subject,
                    cell=cell,
                    realization=realization,
                    resolution=tuple(round(float(r), 4) for r in resolution),  # type: ignore[arg-type]
                    method=method,
                    tre_mm=mean_displacement(matrix, reference, self.points),
                    nmi_brain=float(quality.get('nmi_brain', math.nan)),
                    doubtful=bool(quality.get('doubtful', False)),
                    brain_extracted=self.brain_extracted,
                    seconds=float(record.get('seconds', math.nan)),
                )
            )
            if self.progress is not None:
                self.progress(
                    f'{self.subject} {cell} #{realization + 1} {method}: '
                    f'TRE {self.cases[-1].tre_mm:.2f} mm'
                )


def _by(rows: Sequence[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], Any]) -> dict:
    grouped: dict[Any, dict[str, list[float]]] = {}
    for row in rows:
        grouped.setdefault(key(row), {}).setdefault(row['method'], []).append(row['tre_mm'])
    return grouped


def tre_tables(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: TRE (mm) per image and cell (mean over realizations) and per cell.

    Each table has one column per method (mean; max in brackets per cell) and the
    count of images where CAHAL's TRE is at most trilinear's.
    """
    if not rows:
        return ''
    methods = list(dict.fromkeys(row['method'] for row in rows))
    order = {cell: index for index, cell in enumerate(CELLS)}
    lines = [
        '| image | cell | ' + ' | '.join(f'{m} TRE (mm)' for m in methods) + ' |',
        '| --- | --- |' + ' ---: |' * len(methods),
    ]
    per_image = _by(rows, lambda r: (r['subject'], r['cell']))
    for subject, cell in sorted(per_image, key=lambda k: (k[0], order.get(k[1], 99))):
        values = per_image[(subject, cell)]
        cells = [f'{np.mean(values[m]):.2f}' if m in values else '' for m in methods]
        lines.append(f'| {subject} | {cell} | ' + ' | '.join(cells) + ' |')
    lines += [
        '',
        '| cell | ' + ' | '.join(f'{m} mean [max]' for m in methods) + ' | n |',
        '| --- |' + ' ---: |' * (len(methods) + 1),
    ]
    per_cell = _by(rows, lambda r: r['cell'])
    for cell in sorted(per_cell, key=lambda c: order.get(c, 99)):
        values = per_cell[cell]
        cells = [
            f'{np.mean(values[m]):.2f} [{np.max(values[m]):.2f}]' if m in values else ''
            for m in methods
        ]
        count = max(len(v) for v in values.values())
        lines.append(f'| {cell} | ' + ' | '.join(cells) + f' | {count} |')
    return '\n'.join(lines) + '\n'


def registration_figure(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """TRE per method per cell (bars: mean; dots: each image and realization), as Figure 7."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from cahal_bids.core.atomic import atomic_path

    methods = list(dict.fromkeys(row['method'] for row in rows))
    order = {cell: index for index, cell in enumerate(CELLS)}
    cells = sorted({row['cell'] for row in rows}, key=lambda c: order.get(c, 99))
    colours = {'trilinear': '#7f7f7f', 'cubic': '#1f77b4', 'cahal': '#d95f02', 'truth': '#2ca02c'}
    width = 0.8 / max(len(methods), 1)
    figure, axis = plt.subplots(figsize=(max(5, 1.3 * len(cells) + 2), 4))
    for index, method in enumerate(methods):
        for position, cell in enumerate(cells):
            values = [r['tre_mm'] for r in rows if r['cell'] == cell and r['method'] == method]
            if not values:
                continue
            x = position + (index - (len(methods) - 1) / 2) * width
            colour = colours.get(method, f'C{index + 3}')
            axis.bar(x, float(np.mean(values)), width * 0.9, color=colour,
                     label=method if position == 0 else None)  # fmt: skip
            axis.plot([x] * len(values), values, 'k.', markersize=3)
    axis.set_xticks(range(len(cells)), cells)
    axis.set_ylabel('TRE against the ground truth (mm)')
    axis.set_title('Registration to the template: TRE of each method (mean; dots: cases)')
    axis.legend(frameon=False)
    figure.tight_layout()
    target = Path(path)
    with atomic_path(target) as temporary:
        figure.savefig(temporary, format='png', dpi=110)
    plt.close(figure)
    return target


def registration_hook(
    entry: Any,
    *,
    template: TemplateBrain,
    seed: int = 0,
    sloppy: bool = False,
    saved: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> RegistrationTRE:
    """The TRE hook of one prepared ground truth (a ``PreparedVolume``).

    Skull-stripped or not comes from the entry's preparation record (its detection on
    the source image), else from :func:`~cahal_bids.preprocessing.masks.looks_brain_extracted`
    on the truth. ``saved`` is a previous run's ``{'fingerprint', 'reference'}``
    record of the truth's registration, reused when the fingerprint matches.
    """
    from cahal_bids.preprocessing.masks import looks_brain_extracted

    decided = (entry.metadata.get('brain_extracted') or {}).get('value')
    if decided is None:
        decided, _ = looks_brain_extracted(entry.image(), entry.head_mask())
    hook = RegistrationTRE(
        subject=entry.directory.name,
        template=template,
        truth_affine=entry.affine,
        modality=entry.modality,
        brain_extracted=bool(decided),
        seed=seed,
        sloppy=sloppy,
        progress=progress,
        truth_sha256=str(entry.metadata.get('source_sha256', '')),
    )
    if saved and saved.get('fingerprint') == hook.fingerprint:
        hook.reference = dict(saved['reference'])
    return hook


def write_registration_results(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    template: TemplateBrain | None,
    sloppy: bool,
) -> str:
    """``registration.json``, ``registration.md`` and ``tre_by_cell.png``; the tables'
    section of ``tables.md`` (Markdown)."""
    from cahal_bids.core.atomic import write_json_atomic, write_text_atomic

    folder = Path(out_dir)
    markdown = tre_tables(rows)
    name = template.name if template is not None else 'the template'
    write_json_atomic(
        folder / 'registration.json',
        {
            'template': {'name': name, **(template.record if template is not None else {})},
            'sloppy': sloppy,
            'cases': list(rows),
        },
    )
    write_text_atomic(folder / 'registration.md', markdown)
    registration_figure(rows, folder / 'tre_by_cell.png')
    return (
        f'\nRegistration to {name} (rigid then affine, as cahal-bids): TRE against the '
        "registration of the ground truth, mean over the template's brain voxels (mm):\n\n"
        + markdown
    )
