"""``cahal-eval --routes``: every route's zoo on every image of a split, in one command.

The images (of any contrast) are prepared once, then the usual protocol runs for each route
(its shipped zoo, or ``ROUTE=ZOO``) on all of them, in ``OUT/route-<ROUTE>/`` (each resumable
like any ``cahal-eval`` output); ``OUT/split.md`` and ``OUT/split.json`` hold the tables of
:mod:`cahal_bids.evaluation.split`: per route and image the mean gains over trilinear and
cubic and the cells below each, own contrast and cross-contrast, then every cell; with
``--projections`` (or ``--consistency-projection``) the same tables again for each other
projection of the same restorations.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cahal_bids.cli.common import EXIT_OK, EXIT_USAGE, report_error

__all__ = ['evaluate_routes', 'parse_routes']

PROG = 'cahal-eval'


def parse_routes(specs: list[str]) -> dict[str, Path | None]:
    """``ROUTE`` or ``ROUTE=ZOO_FOLDER`` per entry -> {route: zoo folder or None (shipped)}.

    >>> parse_routes(['T1w', 'FLAIR=/zoos/any'])
    {'T1w': None, 'FLAIR': PosixPath('/zoos/any')}
    """
    from cahal_bids.core.errors import CahalError
    from cahal_bids.engine.zoo import SHIPPED_ZOOS

    routes: dict[str, Path | None] = {}
    for spec in specs:
        route, _, zoo = spec.partition('=')
        if route not in SHIPPED_ZOOS:
            raise CahalError(
                f'--routes {spec}: unknown route {route!r} (one of {sorted(SHIPPED_ZOOS)})'
            )
        if route in routes:
            raise CahalError(f'--routes names {route} twice')
        routes[route] = Path(zoo) if zoo else None
    return routes


def evaluate_routes(
    args: argparse.Namespace, *, evaluate: Callable[[argparse.Namespace], int]
) -> int:
    """Prepare every image once, run ``evaluate`` per route on all, write the split tables."""
    from cahal_bids.cli.evaluation_inputs import split_inputs
    from cahal_bids.core.atomic import write_json_atomic, write_text_atomic
    from cahal_bids.core.errors import CahalError
    from cahal_bids.engine.zoo import default_zoo_path
    from cahal_bids.evaluation.protocol import PROJECTION_METHODS
    from cahal_bids.evaluation.split import cell_gains, split_summary, split_tables
    from cahal_bids.training.preparation import prepare_image
    from cahal_bids.training.prepared import PreparedVolume

    if args.zoo is not None:
        report_error(PROG, '--zoo and --routes exclude each other: give ROUTE=ZOO in --routes')
        return EXIT_USAGE
    try:
        routes = parse_routes(args.routes)
        folders = {
            route: (zoo if zoo is not None else default_zoo_path(route)).resolve()
            for route, zoo in routes.items()
        }
        prepared = []
        for path, contrast in split_inputs(args):
            if path.is_dir():
                prepared.append(PreparedVolume.load(path))
            else:
                prepared.append(
                    prepare_image(
                        path, args.out / 'prepared', modality=contrast, denoise=not args.no_denoise
                    )
                )
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    if not prepared:
        report_error(PROG, 'no image to evaluate')
        return EXIT_USAGE
    contrasts = {entry.directory.name: entry.modality for entry in prepared}
    results: dict[str, list[dict[str, Any]]] = {}
    zoos: dict[str, Any] = {}
    evaluated: dict[Path, str] = {}  # a zoo folder -> the first route that ran it
    for route, zoo in routes.items():
        folder = folders[route]
        if folder in evaluated:  # the same experts on the same images: the same results
            results[route], zoos[route] = results[evaluated[folder]], zoos[evaluated[folder]]
            print(f'{PROG}: route {route} is served by the zoo of {evaluated[folder]}: '
                  'its results are reused', file=sys.stderr)  # fmt: skip
            continue
        evaluated[folder] = route
        routed = argparse.Namespace(**vars(args))
        routed.routes = None
        routed.inputs = [entry.directory for entry in prepared]
        routed.modality, routed.zoo = route, zoo
        routed.out = args.out / f'route-{route}'
        routed.participant_label = routed.bids_filter_file = None
        if routed.segmenter is None:
            routed.no_segmenter = True  # one frozen segmenter per contrast: not across them
        code = evaluate(routed)
        if code != EXIT_OK:
            return code
        record = json.loads((routed.out / 'cases.json').read_text())
        results[route], zoos[route] = record['cases'], record['zoo']
    tables = split_tables(results, contrasts)
    written: dict[str, Any] = {
        'zoos': zoos,
        'images': {name: {'contrast': contrasts[name], 'source': str(entry.source)}
                   for entry in prepared for name in [entry.directory.name]},
        'summary': split_summary(results, contrasts),
        'cells': {route: cell_gains(rows) for route, rows in results.items()},
    }  # fmt: skip
    for mode in args.projections:
        # the same restorations, projected otherwise: the decision which projection is the
        # default is read from these tables side by side
        method = PROJECTION_METHODS[mode]
        tables += f'\n## With projection {mode} (method {method})\n\n' + split_tables(
            results, contrasts, method=method
        )
        written.setdefault('projections', {})[mode] = {
            'method': method,
            'summary': split_summary(results, contrasts, method=method),
            'cells': {route: cell_gains(rows, method=method) for route, rows in results.items()},
        }
    write_text_atomic(args.out / 'split.md', tables)
    write_json_atomic(args.out / 'split.json', written)
    if not args.quiet:
        print(tables)
    print(f'{PROG}: split tables in {args.out / "split.md"}', file=sys.stderr)
    return EXIT_OK
