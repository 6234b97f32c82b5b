"""Calibrate the registration quality threshold (``QUALITY_THRESHOLDS``) on validation images.

Each image is registered to the template as ``cahal-bids`` registers (``register_to_template``),
then the quality measure (``registration_quality``) is computed at that registration and at
deliberate misregistrations around it: shifts of 1-25 mm, tilts of 2-20 degrees about two
axes and scalings of 0.92 and 1.1 about the brain's centre, each with its TRE (mean
displacement over the template's brain, mm) against the registration. Prints one table row
per image (the NMI at its registration, the lowest NMI within 2 mm, the highest 5 mm and
8 mm or more off) and the midpoint between the lowest "within 2 mm" and the highest "8 mm
or more off" over all images, the threshold ``docs/evaluation.md`` reports.

Images are ``LABEL=PATH=CONTRAST`` (a prepared ground truth's ``image.nii.gz``, or a
skull-stripped version of it). Usage::

    TEMPLATEFLOW_HOME=... ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \\
    python benchmarks/calibrate_registration_quality.py --work calib \\
        stroke01_T1w=PREPARED/sub-stroke01_T1w/image.nii.gz=T1w \\
        philips01_T1w=PREPARED/sub-philips01_T1w/image.nii.gz=T1w ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cahal_bids.app.registration import resolve_template, template_brain
from cahal_bids.preprocessing.registration import register_to_template
from cahal_bids.preprocessing.registration_quality import registration_quality
from cahal_bids.preprocessing.transforms import (
    mask_points,
    mean_displacement,
    read_itk_affine,
    rigid_matrix,
    write_itk_affine,
)


def perturbations(seed: int = 0) -> list[tuple[str, float, np.ndarray]]:
    """The deliberate misregistrations (kind, size, 4 x 4 matrix about the origin)."""
    rng = np.random.default_rng(seed)
    found: list[tuple[str, float, np.ndarray]] = [('none', 0.0, np.eye(4))]
    for size in (1, 2, 4, 6, 10, 15, 25):
        direction = rng.normal(size=3)
        found.append(
            ('shift', size, rigid_matrix(0, 0, size * direction / np.linalg.norm(direction)))
        )
    for degrees in (2, 5, 10, 20):
        found.append(('pitch', degrees, rigid_matrix(degrees, 0, (0, 0, 0))))
        found.append(('roll', degrees, rigid_matrix(degrees, 1, (0, 0, 0))))
    for scale in (1.1, 0.92):
        found.append(('scale', scale, np.diag([scale, scale, scale, 1.0])))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('images', nargs='+', help='LABEL=PATH=CONTRAST')
    parser.add_argument('--work', type=Path, required=True, help='transforms and results')
    parser.add_argument('--template', default='MNI152NLin2009cAsym')
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    template = template_brain(args.template, resolve_template(args.template), args.work)
    points = mask_points(template.brain_mask, step=2)
    centre = np.eye(4)
    centre[:3, 3] = points.mean(axis=0)
    results = {}
    for spec in args.images:
        label, path, contrast = spec.split('=')
        registered = register_to_template(
            path,
            template,
            forward_path=args.work / f'{label}_fwd.txt',
            inverse_path=args.work / f'{label}_inv.txt',
            modality=contrast,
        )
        reference = read_itk_affine(registered.forward)
        rows = []
        for kind, size, matrix in perturbations():
            wrong = reference @ centre @ matrix @ np.linalg.inv(centre)
            write_itk_affine(wrong, args.work / 'perturbed.txt')
            quality = registration_quality(
                path, template, args.work / 'perturbed.txt', modality=contrast
            )
            rows.append({
                'kind': kind,
                'size': size,
                'tre_mm': mean_displacement(wrong, reference, points),
                'nmi': quality['nmi_brain'],
            })  # fmt: skip
        results[label] = rows
        (args.work / 'calibration.json').write_text(json.dumps(results, indent=1))
    print('| image | NMI at its registration | lowest within 2 mm | highest >= 5 mm off | '
          'highest >= 8 mm off |')  # fmt: skip
    print('| --- | ---: | ---: | ---: | ---: |')
    good, bad = [], []
    for label, rows in results.items():
        within = [r['nmi'] for r in rows if r['tre_mm'] <= 2]
        five = [r['nmi'] for r in rows if r['tre_mm'] >= 5]
        eight = [r['nmi'] for r in rows if r['tre_mm'] >= 8]
        good.append(min(within))
        bad.append(max(eight))
        print(f'| {label} | {rows[0]["nmi"]:.4f} | {min(within):.4f} | {max(five):.4f} | '
              f'{max(eight):.4f} |')  # fmt: skip
    print(f'threshold (midpoint): {(min(good) + max(bad)) / 2:.4f}')


if __name__ == '__main__':
    main()
