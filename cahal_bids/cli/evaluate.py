"""``cahal-eval``: the paper's evaluation protocol on the user's own high-resolution images.

Inputs are high-resolution NIfTI images, folders prepared by ``cahal-train prepare``, or
BIDS datasets (their T1w or FLAIR images, narrowed by ``--participant-label`` and
``--bids-filter-file``). Each is prepared as for training, then every cell of the grid is
simulated ``--realizations`` times and the trilinear reference, cubic B-spline, CAHAL
(``--zoo``) and any ``--method NAME=COMMAND`` are compared. Writes ``cases.json`` (every
case, seeds included), ``tables.md`` (PSNR by volume bin and by cell, Mann-Whitney U
two-sided with Bonferroni correction against the reference; tissue Dice and volumetric
bias with a segmenter), figures and ``report.html``. Finished cells are kept in
``OUT/cases/``: the same command run again resumes where it stopped.

With ``--registration``, every simulated acquisition of the ``--registration-cells``
is also registered to the template (``--template-name``, read offline from
TemplateFlow, or ``--template-file``) from each method's estimate and from the ground
truth, exactly as ``cahal-bids`` registers; the target registration error (TRE, mean
displacement over the template's brain voxels, mm) of each against the ground truth's
goes to ``registration.json``, ``registration.md`` and ``tre_by_cell.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cahal_bids.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, make_parser, report_error
from cahal_bids.cli.evaluation_inputs import prepared_entries
from cahal_bids.core.modalities import MODALITIES
from cahal_bids.engine.consistency_guard import DEFAULT_PROJECTION, PROJECTIONS
from cahal_bids.evaluation.protocol import PROJECTION_METHODS

PROG = 'cahal-eval'


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, __doc__.split('\n\n', 1)[1].strip())
    parser.add_argument(
        'inputs',
        nargs='+',
        type=Path,
        metavar='INPUT',
        help='high-resolution NIfTI images, folders prepared by `cahal-train prepare`, or '
        'BIDS datasets',
    )
    parser.add_argument('--out', type=Path, required=True, help='folder for the results')
    parser.add_argument('--zoo', type=Path, help='zoo to evaluate (default: the shipped one)')
    parser.add_argument('--modality', choices=MODALITIES, default='T1w')
    parser.add_argument(
        '--routes',
        nargs='+',
        default=None,
        metavar='ROUTE[=ZOO]',
        help='evaluate each route (its shipped zoo, or ZOO) on every input image of any '
        'contrast (own contrast and cross-contrast), prepared once; per-route results in '
        'OUT/route-ROUTE, the per-image and per-cell tables in OUT/split.md (no tissue '
        'measures unless --segmenter)',
    )
    parser.add_argument('--realizations', type=int, default=3)
    parser.add_argument('--cells', nargs='+', default=None, help='cells (default: all 18)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--participant-label',
        '--participant_label',
        nargs='+',
        default=None,
        help='BIDS inputs: only these participants (with or without "sub-")',
    )
    parser.add_argument(
        '--bids-filter-file',
        '--bids_filter_file',
        type=Path,
        default=None,
        help='BIDS inputs: JSON of PyBIDS entities per query ("t1w", "flair"), as cahal-bids',
    )
    parser.add_argument(
        '--method',
        action='append',
        default=[],
        metavar='NAME=COMMAND',
        help='another method to compare: a command line with {input} (the simulated '
        'low-resolution NIfTI) and {output} (where it writes its estimate); repeatable',
    )
    parser.add_argument(
        '--method-timeout',
        '--method_timeout',
        type=float,
        default=3600.0,
        help='seconds an external method may take per case (default %(default)s)',
    )
    tissue = parser.add_mutually_exclusive_group()
    tissue.add_argument(
        '--segmenter',
        type=Path,
        default=None,
        help='frozen tissue segmenter folder for tissue Dice, volume errors and the '
        'volumetric bias (default: the one shipped for the modality, if any)',
    )
    tissue.add_argument(
        '--no-segmenter',
        '--no_segmenter',
        action='store_true',
        help='no tissue measures',
    )
    parser.add_argument(
        '--no-denoise',
        '--no_denoise',
        action='store_true',
        help='prepare raw inputs without denoising',
    )
    parser.add_argument(
        '--lesions',
        action='store_true',
        help='also insert synthetic lesions and measure how much of their contrast and '
        'volume each method keeps (lesions.json, lesions.md)',
    )
    parser.add_argument(
        '--real-lesions',
        '--real_lesions',
        action='store_true',
        help='FLAIR: also find hyperintense lesions in the ground truth by a fixed threshold '
        'and measure each method on them (real_lesions.json, real_lesions.md)',
    )
    parser.add_argument(
        '--consistency-projection',
        '--consistency_projection',
        action='store_true',
        help="also evaluate 'cahal+projection': the expert's output projected exactly onto "
        'the acquired data, as cahal-enhance --consistency-projection exact does (the same '
        'expert run); the same as --projections exact',
    )
    parser.add_argument(
        '--cahal-projection',
        '--cahal_projection',
        choices=PROJECTIONS,
        default=DEFAULT_PROJECTION,
        help="the projection of the method 'cahal' (default: %(default)s, as cahal-enhance)",
    )
    parser.add_argument(
        '--projections',
        nargs='+',
        choices=PROJECTIONS,
        default=[],
        metavar='MODE',
        help="also evaluate these projection modes beside 'cahal' (see --cahal-projection), "
        "from the same expert run: off ('"
        f"{PROJECTION_METHODS['off']}'), adaptive ('{PROJECTION_METHODS['adaptive']}'), "
        f"exact ('{PROJECTION_METHODS['exact']}')",
    )
    parser.add_argument(
        '--no-flat-check',
        '--no_flat_check',
        action='store_true',
        help='skip the full-size flat-region (no hallucination) check',
    )
    registration = parser.add_argument_group("registration accuracy (the paper's Figure 7)")
    registration.add_argument(
        '--registration',
        action='store_true',
        help='also register every estimate and the ground truth to the template and '
        "report the TRE of each method against the ground truth's registration",
    )
    registration.add_argument(
        '--registration-cells',
        '--registration_cells',
        nargs='+',
        default=None,
        metavar='CELL',
        help='cells whose cases are registered (default: every evaluated cell); each '
        'case costs one ANTs registration per method',
    )
    registration.add_argument(
        '--template-name',
        '--template_name',
        default='MNI152NLin2009cAsym',
        help='TemplateFlow template (offline, TEMPLATEFLOW_HOME) (default %(default)s)',
    )
    registration.add_argument(
        '--template-file',
        '--template_file',
        type=Path,
        default=None,
        help="a 1 mm T1w template image instead of TemplateFlow's",
    )
    registration.add_argument(
        '--sloppy',
        action='store_true',
        help="registration with ANTs' fast presets (tests, previews; not for reporting)",
    )
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--quiet', '-q', action='store_true')
    return parser


def _fingerprint(args: argparse.Namespace, zoo: Any, methods: dict[str, str], cell: str) -> str:
    """What makes a finished cell reusable: the same expert run the same way, protocol,
    methods and segmenter (so refining some experts of a zoo re-evaluates only theirs)."""
    choice = zoo.choose(cell)
    segmenter_bytes = (
        (args.segmenter / 'segmenter.json').read_bytes() if args.segmenter is not None else b''
    )
    content = json.dumps(
        {
            'expert': [choice.cell, choice.sha256],
            'inference': {
                'architecture': zoo.architecture,
                'normalization': zoo.normalization,
                'norm_statistics': zoo.norm_statistics,
                'axis_order': zoo.axis_order,
            },
            'segmenter': hashlib.sha256(segmenter_bytes).hexdigest(),
            'realizations': args.realizations,
            'seed': args.seed,
            'methods': methods,
            'format': 3,
        },
        sort_keys=True,
    )
    return hashlib.sha256(content.encode()).hexdigest()


class ExampleSlices:
    """Keeps, for the first realization of each cell, one slice through the thick axis."""

    def __init__(self) -> None:
        self.slices: dict[str, np.ndarray] = {}
        self.axis: int = 0

    def __call__(self, *, cell, realization, resolution, truth, estimates) -> None:
        if realization != 0:
            return
        thick = int(np.argmax(resolution))
        axis = next(a for a in (1, 0, 2) if a != thick)  # coronal unless coronal is thick
        index = truth.shape[axis] // 2
        self.axis = axis
        self.slices = {'truth': np.take(truth, index, axis=axis).astype(np.float32)}
        for name, estimate in estimates.items():
            self.slices[name] = np.take(estimate, index, axis=axis).astype(np.float32)


def _evaluate_cell(
    entry: Any,
    cell: str,
    *,
    args: argparse.Namespace,
    enhancer: Any,
    extra: dict[str, Any],
    segmenter: Any,
    fingerprint: str,
    cache: dict[str, Any],
    registration: Any = None,
    registration_rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One cell of one subject, from ``OUT/cases`` when it was finished before.

    With ``registration`` (a :class:`~cahal_bids.evaluation.registration.RegistrationTRE`),
    the cell's registration cases are appended to ``registration_rows``, from
    ``OUT/cases/<subject>/<cell>_registration.json`` when it holds them; otherwise the
    cell's acquisitions are simulated again (same seeds, same estimates) to register them.
    """
    from cahal_bids.core.atomic import atomic_path
    from cahal_bids.engine.inference import write_json_atomic
    from cahal_bids.evaluation.protocol import evaluate_volume

    folder = args.out / 'cases' / entry.directory.name
    record_path = folder / f'{cell}.json'
    registration_path = folder / f'{cell}_registration.json'
    registration_fingerprint = hashlib.sha256(
        f'{fingerprint}:{registration.fingerprint if registration else ""}'.encode()
    ).hexdigest()
    if registration is not None and registration_rows is not None:
        saved = _read_record(registration_path)
        if saved.get('fingerprint') == registration_fingerprint:
            registration_rows += saved['cases']
            registration = None
    saved = _read_record(record_path)
    if saved.get('fingerprint') == fingerprint and registration is None:
        return list(saved['cases'])
    if 'image' not in cache:
        cache['image'] = entry.image()
        cache['mask'] = entry.head_mask()
    examples = ExampleSlices()
    hooks: list[Any] = [examples]
    if registration is not None:
        registration.cases.clear()
        hooks.append(registration)
    cases = evaluate_volume(
        cache['image'],
        cache['mask'],
        entry.affine,
        subject=entry.directory.name,
        enhancer=enhancer,
        cells=(cell,),
        realizations=args.realizations,
        seed=args.seed,
        extra_methods=extra,
        segmenter=segmenter,
        on_estimates=lambda **found: [hook(**found) for hook in hooks],
        projections=args.projections,
    )
    folder.mkdir(parents=True, exist_ok=True)
    if registration is not None and registration_rows is not None:
        found = [case.as_dict() for case in registration.cases]
        write_json_atomic(
            registration_path,
            {'fingerprint': registration_fingerprint, 'cell': cell, 'cases': found},
        )
        registration_rows += found
    if examples.slices:
        with atomic_path(folder / f'{cell}_slices.npz') as temporary, open(temporary, 'wb') as f:
            np.savez_compressed(f, axis=np.array(examples.axis), **examples.slices)
    rows = [case.as_dict() for case in cases]
    write_json_atomic(record_path, {'fingerprint': fingerprint, 'cell': cell, 'cases': rows})
    return rows


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _summary_from_dicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from cahal_bids.evaluation.protocol import EvaluationCase, summarize

    cases = []
    for row in rows:
        values = dict(row)
        values['resolution'] = tuple(values['resolution'])
        cases.append(EvaluationCase(**values))
    return summarize(cases)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.consistency_projection and 'exact' not in args.projections:
        args.projections = [*args.projections, 'exact']
    if args.routes:
        from cahal_bids.cli.evaluate_split import evaluate_routes

        return evaluate_routes(args, evaluate=_evaluate)
    return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    """The protocol for one zoo (``args.zoo``, or the shipped one of ``args.modality``)."""
    import torch

    from cahal_bids.cli.enhance import default_threads
    from cahal_bids.core.errors import CahalError
    from cahal_bids.core.routing import CELLS
    from cahal_bids.engine.inference import Enhancer, resolve_device, write_json_atomic
    from cahal_bids.engine.zoo import Zoo, default_zoo_path
    from cahal_bids.evaluation.external_methods import command_method, parse_method_spec
    from cahal_bids.evaluation.protocol import (
        markdown_tables,
        mean_dice,
        volumetric_bias,
        volumetric_bias_table,
    )

    torch.set_num_threads(args.threads or default_threads())
    cells = tuple(args.cells) if args.cells else CELLS
    if set(cells) - set(CELLS):
        report_error(PROG, f'unknown cells {sorted(set(cells) - set(CELLS))}')
        return EXIT_USAGE
    if args.realizations < 1:
        report_error(PROG, f'--realizations must be at least 1, got {args.realizations}')
        return EXIT_USAGE
    if args.real_lesions and args.modality != 'FLAIR':
        report_error(PROG, '--real-lesions finds hyperintense lesions: use it with FLAIR')
        return EXIT_USAGE
    registration_cells = set(args.registration_cells or cells) if args.registration else set()
    if registration_cells - set(cells):
        report_error(
            PROG, f'--registration-cells {sorted(registration_cells - set(cells))} not evaluated'
        )
        return EXIT_USAGE
    try:
        templates = dict(parse_method_spec(spec) for spec in args.method)
        if len(templates) != len(args.method):
            raise CahalError('two --method options share a name')
        zoo = Zoo.open(args.zoo if args.zoo else default_zoo_path(args.modality))
        device = resolve_device(args.device)
        enhancer = Enhancer(zoo, device=device, consistency_projection=args.cahal_projection)
        segmenter = None
        if args.segmenter is None and not args.no_segmenter:
            from cahal_bids.engine.segmenter import default_segmenter_path

            args.segmenter = default_segmenter_path(args.modality)
        if args.segmenter is not None:
            from cahal_bids.engine.segmenter import load_segmenter

            segmenter = load_segmenter(args.segmenter, device=device)
        args.out.mkdir(parents=True, exist_ok=True)
        template_brain_files = None
        if args.registration:
            from cahal_bids.app.registration import resolve_template, template_brain

            head = resolve_template(args.template_name, template_file=args.template_file)
            template_brain_files = template_brain(args.template_name, head, args.out)
        entries = prepared_entries(args)
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    extra = {
        name: command_method(name, template, timeout_s=args.method_timeout)
        for name, template in templates.items()
    }
    # the built-in projection is part of what makes a finished cell reusable
    compared = {
        **templates,
        'cahal': f'built-in, projection {enhancer.consistency_projection}',
        **{PROJECTION_METHODS[mode]: 'built-in' for mode in args.projections},
    }
    rows: list[dict[str, Any]] = []
    progress = None if args.quiet else (lambda text: print(text, file=sys.stderr))
    registration_rows: list[dict[str, Any]] = []
    for entry in entries:
        cache: dict[str, Any] = {}
        hook = None
        if template_brain_files is not None:
            from cahal_bids.evaluation.registration import registration_hook

            reference_path = args.out / 'cases' / entry.directory.name / 'truth_registration.json'
            hook = registration_hook(
                entry,
                template=template_brain_files,
                seed=args.seed,
                sloppy=args.sloppy,
                saved=_read_record(reference_path),
                progress=progress,
            )
            hook.reference_path = reference_path
        for cell in cells:
            try:
                rows += _evaluate_cell(
                    entry,
                    cell,
                    args=args,
                    enhancer=enhancer,
                    extra=extra,
                    segmenter=segmenter,
                    fingerprint=_fingerprint(args, zoo, compared, cell),
                    cache=cache,
                    registration=hook if cell in registration_cells else None,
                    registration_rows=registration_rows,
                )
            except CahalError as error:
                report_error(PROG, f'{entry.directory}: {error}')
                return EXIT_FAILURE
            if hook is not None and hook.reference is not None:
                saved = _read_record(hook.reference_path)
                if saved.get('fingerprint') != hook.fingerprint:
                    write_json_atomic(
                        hook.reference_path,
                        {'fingerprint': hook.fingerprint, 'reference': hook.reference},
                    )
            if progress is not None:
                progress(f'{PROG}: {entry.directory.name} {cell} done')
    methods = {'trilinear': None, 'cubic': None, 'cahal': None, **compared, **extra}
    summary = _summary_from_dicts(rows)
    tables = markdown_tables(summary)
    bias = volumetric_bias(rows)
    dice = mean_dice(rows)
    tissue_md = volumetric_bias_table(bias, dice)
    if tissue_md:
        tables += (
            '\nTissue classes of the frozen segmenter: mean relative volume error against the '
            'ground truth [95 % interval] and mean Dice:\n\n' + tissue_md
        )
    lesion_rows: list[dict] = []
    real_lesion_rows: list[dict] = []
    if args.lesions or args.real_lesions:
        from cahal_bids.evaluation.lesions import evaluate_lesions, evaluate_real_lesions
        from cahal_bids.evaluation.protocol import cahal_methods, cubic_bspline, trilinear

        lesion_methods = {
            'trilinear': trilinear,
            'cubic': cubic_bspline,
            **cahal_methods(enhancer, projections=args.projections),
            **extra,
        }
        for entry in entries:
            truth, brain = entry.image(), entry.brain_mask()
            for wanted, evaluate_rows, found in (
                (args.lesions, evaluate_lesions, lesion_rows),
                (args.real_lesions, evaluate_real_lesions, real_lesion_rows),
            ):
                if wanted:
                    found += evaluate_rows(
                        truth,
                        brain,
                        subject=entry.directory.name,
                        methods=lesion_methods,
                        seed=args.seed,
                    )
    flat: dict[str, Any] = {}
    if not args.no_flat_check and entries:
        from cahal_bids.evaluation.flat_regions import flat_region_changes, flat_region_table

        shape = entries[0].image().shape
        low_shape = (shape[0], shape[1], max(shape[2] // 4, 4))
        flat = {
            'low_resolution_shape': list(low_shape),
            'changes': flat_region_changes(enhancer, low_shape),
        }
        tables += flat_region_table(flat['changes'], low_shape)
    if registration_rows:
        from cahal_bids.evaluation.registration import write_registration_results

        tables += write_registration_results(
            args.out, registration_rows, template=template_brain_files, sloppy=args.sloppy
        )
    write_json_atomic(
        args.out / 'cases.json',
        {
            'zoo': {'name': zoo.name, 'version': zoo.version, 'path': str(zoo.path)},
            'inputs': [str(entry.source) for entry in entries],
            'realizations': args.realizations,
            'seed': args.seed,
            'methods': {name: templates.get(name, 'built-in') for name in methods},
            'segmenter': None if args.segmenter is None else str(args.segmenter),
            'cases': rows,
            'summary_psnr': summary,
            'volumetric_bias': bias,
            'mean_dice': dice,
            'flat_regions': flat,
        },
    )
    (args.out / 'tables.md').write_text(tables)
    if lesion_rows:
        from cahal_bids.evaluation.lesions import lesion_table

        write_json_atomic(args.out / 'lesions.json', {'seed': args.seed, 'rows': lesion_rows})
        lesions_md = lesion_table(lesion_rows)
        (args.out / 'lesions.md').write_text(lesions_md)
        tables += '\nLesion preservation (contrast ratio / volume ratio; 1.00 = as in truth):\n\n'
        tables += lesions_md
    if real_lesion_rows:
        from cahal_bids.evaluation.lesions import lesion_table

        write_json_atomic(
            args.out / 'real_lesions.json', {'seed': args.seed, 'rows': real_lesion_rows}
        )
        real_md = lesion_table(real_lesion_rows)
        (args.out / 'real_lesions.md').write_text(real_md)
        count = len({(r['subject'], r['lesion']) for r in real_lesion_rows})
        tables += (
            f'\nReal lesions ({count} thresholded hyperintense lesions; contrast ratio / '
            'volume ratio; 1.00 = as in truth):\n\n' + real_md
        )
    elif args.real_lesions:
        tables += '\nReal lesions: no hyperintense lesion found by the threshold.\n'
    from cahal_bids.evaluation.report import write_evaluation_report

    write_evaluation_report(
        args.out,
        rows,
        tables=tables,
        title=f'cahal-eval: {zoo.name} {zoo.version} ({args.modality})',
        slices_dir=args.out / 'cases' / entries[0].directory.name if entries else None,
    )
    if not args.quiet:
        print(tables)
    print(f'{PROG}: results in {args.out}', file=sys.stderr)
    return EXIT_OK
