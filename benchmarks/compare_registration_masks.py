#!/usr/bin/env python
"""Which metric mask for the finest affine levels makes a head and its skull-stripped copy agree?

For each ``LABEL=FULL=HULL=CLOSED`` (a full-head image and two skull-stripped versions of
it) and each margin (mm; positive grows the template's brain mask, negative erodes it, 0
keeps it), every version is registered to the template as ``cahal-bids`` registers it
(``register_linear`` from the multi-start initialisation: full heads on the whole head,
skull-stripped versions to the brain-extracted template in the brain mask grown by 5 mm),
except that the two finest affine levels use that mask. Prints the TRE (mean over the
template's brain, mm) between the versions. ``docs/evaluation.md`` has the table that chose
``BRAIN_CORE_EROSION_MM``. Usage::

    TEMPLATEFLOW_HOME=... ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \\
    python benchmarks/compare_registration_masks.py --work masks --margins 5 0 -4 -8 \\
        arc2265=FULL.nii.gz=HULL.nii.gz=CLOSED.nii.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ants

from cahal_bids.app.registration import resolve_template, template_brain
from cahal_bids.preprocessing.registration import BRAIN_MASK_MARGIN_MM, register_linear
from cahal_bids.preprocessing.registration_quality import read_ants
from cahal_bids.preprocessing.transforms import mask_points, mean_displacement, read_itk_affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('images', nargs='+', help='LABEL=FULL=HULL=CLOSED')
    parser.add_argument('--work', type=Path, required=True)
    parser.add_argument('--margins', type=int, nargs='+', default=[5, 0, -4, -8])
    parser.add_argument('--template', default='MNI152NLin2009cAsym')
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    template = template_brain(args.template, resolve_template(args.template), args.work)
    points = mask_points(template.brain_mask, step=2)
    brain = read_ants(template.brain_mask)
    grown = args.work / 'grown.nii.gz'
    ants.image_write(ants.iMath(brain, 'MD', int(round(BRAIN_MASK_MARGIN_MM))), str(grown))
    print('| image | finest levels: margin (mm) | hull vs full | closed vs full | '
          'hull vs closed |')  # fmt: skip
    print('| --- | ---: | ---: | ---: | ---: |')
    for spec in args.images:
        label, *paths = spec.split('=')
        for margin in args.margins:
            mask = args.work / f'margin{margin}.nii.gz'
            changed = ants.iMath(brain, 'MD' if margin > 0 else 'ME', abs(margin))
            ants.image_write(changed if margin else brain, str(mask))
            found = {}
            for version, path in zip(('full', 'hull', 'closed'), paths, strict=True):
                forward = args.work / f'{label}_{version}_{margin}_fwd.txt'
                if not forward.exists():
                    stripped = version != 'full'
                    register_linear(
                        path,
                        template.brain if stripped else template.head,
                        forward_path=forward,
                        inverse_path=args.work / f'{label}_{version}_{margin}_inv.txt',
                        fixed_mask=grown if stripped else None,
                        affine_mask=mask,
                        initialize=True,
                    )
                found[version] = read_itk_affine(forward)
            hull, closed = (mean_displacement(found[v], found['full'], points)
                            for v in ('hull', 'closed'))  # fmt: skip
            both = mean_displacement(found['hull'], found['closed'], points)
            row = f'| {label} | {margin:+d} | {hull:.2f} | {closed:.2f} | {both:.2f} |'
            print(row, flush=True)


if __name__ == '__main__':
    main()
