"""Pieces shared by every cahal-bids command line: version flag, exit codes, error reports."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cahal_bids import __version__

EXIT_OK = 0
"""Everything asked for was done."""
EXIT_FAILURE = 1
"""Processing failed for at least one input."""
EXIT_USAGE = 2
"""Bad command line or bad input dataset (nothing was processed)."""


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the project's ``--version`` flag already added."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('--version', action='version', version=f'{prog} {__version__}')
    return parser


def positive_int(text: str) -> int:
    """``argparse`` type for options that take a count (threads, tile size, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value


def routed_contrast(text: str) -> str:
    """``argparse`` type for a contrast to restore: a BIDS suffix that has a route.

    A contrast without one (``PD``, ``T2starw``, ...) is refused with a one-line reason
    naming the routed contrasts (:data:`cahal_bids.engine.zoo.ROUTED_MODALITIES`).
    """
    from cahal_bids.engine.zoo import ROUTED_MODALITIES

    if text in ROUTED_MODALITIES:
        return text
    spelled = [name for name in ROUTED_MODALITIES if name.lower() == text.lower()]
    if spelled:
        raise argparse.ArgumentTypeError(
            f'{text!r}: BIDS suffixes are case-sensitive, write {spelled[0]}'
        )
    raise argparse.ArgumentTypeError(
        f'{text!r} has no route (no zoo restores {text} images); '
        f'the routed contrasts are {", ".join(ROUTED_MODALITIES)}'
    )


def projection_option() -> dict[str, Any]:
    """``add_argument`` keywords of ``--consistency-projection`` (cahal-enhance, cahal-bids)."""
    from cahal_bids.engine.consistency_guard import DEFAULT_PROJECTION, PROJECTIONS

    return {
        'nargs': '?',
        'choices': PROJECTIONS,
        'const': 'exact',
        'default': DEFAULT_PROJECTION,
        'help': 'what follows the expert: off; adaptive, which moves the restored image '
        'towards consistency with the acquired data (acquired again with the box '
        'point-spread function) only as far as the noise estimated in the input allows; '
        'or exact, which projects it onto the images that give back the input exactly, '
        'noise included (the flag alone). Default: %(default)s; the sidecar records it',
    }


def report_error(prog: str, message: str) -> None:
    """Print a one-line error on stderr, prefixed with the program name."""
    first_line = ' '.join(str(message).split())
    print(f'{prog}: error: {first_line}', file=sys.stderr)
