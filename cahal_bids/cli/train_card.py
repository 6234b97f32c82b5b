"""``cahal-train card``: regenerate a zoo's ``MODEL_CARD.md`` from its manifest and measurements.

The card (:mod:`cahal_bids.evaluation.model_card`) is rendered from the zoo's manifest, a
``cahal-eval`` output folder (``--evaluation``), optionally the folder of a
``cahal-eval --routes`` run over the whole validation split (``--split``), and a JSON file
of what no measurement holds (``--card-inputs``): the commands that reproduce the zoo, the
data credits, limitations, the ablation table and which images chose between models.
Keeping those in a file beside the docs lets the card be rebuilt whenever the zoo or its
evaluation changes, with no hand edits. Exit codes: 0 written, 2 a missing or malformed
input (named on stderr), 1 the card could not be written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cahal_bids.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, report_error

PROG = 'cahal-train card'

CARD_INPUT_LISTS = ('commands', 'data_credits', 'notes')
"""Keys of ``--card-inputs`` that hold lists of strings (``commands`` and ``data_credits``
are required)."""

CARD_INPUT_TEXTS = ('ablations', 'selection')
"""Keys of ``--card-inputs`` that hold one (Markdown) string each, optional."""


def add_card_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``card`` options to ``parser`` (a subcommand parser) and return it."""
    parser.description = (
        "Render a zoo's MODEL_CARD.md from its manifest, a cahal-eval output folder, "
        'optionally a cahal-eval --routes run over the whole validation split, and a JSON '
        'file of what no measurement holds (the commands that reproduce the zoo, data '
        'credits, limitations, ablations, which images chose between models).'
    )
    parser.add_argument(
        'zoo', type=Path, help='zoo folder (its manifest.json; the card goes there)'
    )
    parser.add_argument(
        '--evaluation',
        type=Path,
        required=True,
        help='cahal-eval output folder (cases.json, tables.md, lesions.md if measured)',
    )
    parser.add_argument(
        '--split',
        type=Path,
        help='cahal-eval --routes output folder over the validation split (its split.md)',
    )
    parser.add_argument(
        '--registration',
        type=Path,
        nargs='+',
        default=[],
        metavar='DIR',
        help='cahal-eval --registration output folders (their registration.md: TRE tables)',
    )
    parser.add_argument(
        '--card-inputs',
        '--card_inputs',
        type=Path,
        required=True,
        help='JSON: "commands" and "data_credits" (lists of lines), optional "notes" '
        '(limitations), "ablations" (Markdown) and "selection" (which images chose models)',
    )
    return parser


def read_card_inputs(path: Path) -> dict[str, Any]:
    """The checked contents of a ``--card-inputs`` file; ValueError names the problem."""
    try:
        found = json.loads(path.read_text(encoding='utf-8'))
    except OSError as error:
        raise ValueError(f'{path}: cannot read ({error.strerror or error})') from None
    except json.JSONDecodeError as error:
        raise ValueError(f'{path}: not valid JSON ({error})') from None
    if not isinstance(found, dict):
        raise ValueError(f'{path}: expected a JSON object')
    unknown = sorted(set(found) - set(CARD_INPUT_LISTS) - set(CARD_INPUT_TEXTS))
    if unknown:
        raise ValueError(f'{path}: unknown keys {", ".join(unknown)}')
    for key in ('commands', 'data_credits'):
        if key not in found:
            raise ValueError(f'{path}: "{key}" is required')
    for key in CARD_INPUT_LISTS:
        value = found.get(key, [])
        if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
            raise ValueError(f'{path}: "{key}" must be a list of strings')
    for key in CARD_INPUT_TEXTS:
        if not isinstance(found.get(key, ''), str):
            raise ValueError(f'{path}: "{key}" must be a string')
    return found


def run_card(args: argparse.Namespace) -> int:
    from cahal_bids.evaluation.model_card import write_model_card

    try:
        inputs = read_card_inputs(args.card_inputs)
    except ValueError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    needed = [args.zoo / 'manifest.json', args.evaluation / 'cases.json']
    needed.append(args.evaluation / 'tables.md')
    if args.split is not None:
        needed.append(args.split / 'split.md')
    for folder in args.registration:
        needed += [folder / 'cases.json', folder / 'registration.md']
    for path in needed:
        if not path.is_file():
            report_error(PROG, f'{path}: not found')
            return EXIT_USAGE
    try:
        path = write_model_card(
            args.zoo,
            args.evaluation,
            commands=inputs['commands'],
            data_credits=inputs['data_credits'],
            notes=inputs.get('notes', []),
            ablations=inputs.get('ablations', ''),
            split_dir=args.split,
            selection=inputs.get('selection', ''),
            registration_dirs=args.registration,
        )
    except (OSError, ValueError, KeyError) as error:
        report_error(PROG, f'{args.zoo}: cannot write the model card ({error})')
        return EXIT_FAILURE
    print(f'{PROG}: {path}')
    return EXIT_OK
