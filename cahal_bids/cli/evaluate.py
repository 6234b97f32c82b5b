"""``cahal-eval``: the paper's evaluation protocol on the user's own high-resolution images.

Each input is prepared as for training (or given as a prepared cache entry), then every
cell of the grid is simulated ``--realizations`` times and the trilinear reference, cubic
B-spline and CAHAL (``--zoo``) are compared. Writes ``cases.json`` (every case, seeds
included) and ``tables.md`` (PSNR by volume bin and by cell, Mann-Whitney U two-sided
with Bonferroni correction against the reference).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cahal_bids.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, make_parser, report_error

PROG = 'cahal-eval'


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, __doc__.split('\n\n', 1)[1].strip())
    parser.add_argument(
        'inputs',
        nargs='+',
        type=Path,
        metavar='INPUT',
        help='high-resolution NIfTI images, or folders prepared by `cahal-train prepare`',
    )
    parser.add_argument('--out', type=Path, required=True, help='folder for the results')
    parser.add_argument('--zoo', type=Path, help='zoo to evaluate (default: the shipped one)')
    parser.add_argument('--modality', choices=('T1w', 'FLAIR'), default='T1w')
    parser.add_argument('--realizations', type=int, default=3)
    parser.add_argument('--cells', nargs='+', default=None, help='cells (default: all 18)')
    parser.add_argument('--seed', type=int, default=0)
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
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--quiet', '-q', action='store_true')
    return parser


def _prepared_entries(args: argparse.Namespace):
    from cahal_bids.preparation import PreparedVolume, prepare_image

    entries = []
    for path in args.inputs:
        if path.is_dir():
            entries.append(PreparedVolume.load(path))
        else:
            entries.append(
                prepare_image(
                    path,
                    args.out / 'prepared',
                    modality=args.modality,
                    denoise=not args.no_denoise,
                )
            )
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from cahal_bids.cli.enhance import default_threads
    from cahal_bids.errors import CahalError
    from cahal_bids.evaluation import evaluate_volume, markdown_tables, summarize
    from cahal_bids.inference import Enhancer, resolve_device, write_json_atomic
    from cahal_bids.routing import CELLS
    from cahal_bids.zoo import Zoo, default_zoo_path

    torch.set_num_threads(args.threads or default_threads())
    cells = tuple(args.cells) if args.cells else CELLS
    if set(cells) - set(CELLS):
        report_error(PROG, f'unknown cells {sorted(set(cells) - set(CELLS))}')
        return EXIT_USAGE
    try:
        zoo = Zoo.open(args.zoo if args.zoo else default_zoo_path(args.modality))
        enhancer = Enhancer(zoo, device=resolve_device(args.device))
        args.out.mkdir(parents=True, exist_ok=True)
        entries = _prepared_entries(args)
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    cases = []
    for entry in entries:
        subject = entry.directory.name
        progress = None if args.quiet else (lambda text: print(text, file=sys.stderr))
        try:
            cases += evaluate_volume(
                entry.image(),
                entry.head_mask(),
                entry.affine,
                subject=subject,
                enhancer=enhancer,
                cells=cells,
                realizations=args.realizations,
                seed=args.seed,
                progress=progress,
            )
        except CahalError as error:
            report_error(PROG, f'{entry.directory}: {error}')
            return EXIT_FAILURE
    lesion_rows: list[dict] = []
    if args.lesions:
        from cahal_bids.evaluation import cahal_method, cubic_bspline, trilinear
        from cahal_bids.lesions import evaluate_lesions

        methods = {'trilinear': trilinear, 'cubic': cubic_bspline, 'cahal': cahal_method(enhancer)}
        for entry in entries:
            lesion_rows += evaluate_lesions(
                entry.image(),
                entry.brain_mask(),
                subject=entry.directory.name,
                methods=methods,
                seed=args.seed,
            )
    summary = summarize(cases)
    write_json_atomic(
        args.out / 'cases.json',
        {
            'zoo': {'name': zoo.name, 'version': zoo.version, 'path': str(zoo.path)},
            'inputs': [str(entry.source) for entry in entries],
            'realizations': args.realizations,
            'seed': args.seed,
            'cases': [case.as_dict() for case in cases],
            'summary_psnr': summary,
        },
    )
    tables = markdown_tables(summary)
    (args.out / 'tables.md').write_text(tables)
    if lesion_rows:
        from cahal_bids.lesions import lesion_table

        write_json_atomic(args.out / 'lesions.json', {'seed': args.seed, 'rows': lesion_rows})
        lesions_md = lesion_table(lesion_rows)
        (args.out / 'lesions.md').write_text(lesions_md)
        tables += '\nLesion preservation (contrast ratio / volume ratio; 1.00 = as in truth):\n\n'
        tables += lesions_md
    from cahal_bids.evaluation_report import write_evaluation_report

    write_evaluation_report(
        args.out,
        [case.as_dict() for case in cases],
        tables=tables,
        title=f'cahal-eval: {zoo.name} {zoo.version} ({args.modality})',
    )
    if not args.quiet:
        print(tables)
    print(f'{PROG}: results in {args.out}', file=sys.stderr)
    return EXIT_OK
