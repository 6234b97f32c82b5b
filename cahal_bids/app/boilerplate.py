"""The methods text (citation boilerplate) of a run, as its workflow describes itself.

Each workflow factory states what it does, with the run's options and the software
versions, in ``workflow.__desc__`` (niworkflows' ``LiterateWorkflow``); the top-level
workflow adds the references as its ``__postdesc__``. This module only collects that
text (:meth:`~niworkflows.engine.workflows.LiterateWorkflow.visit_desc`) and writes it.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from cahal_bids.core.atomic import write_text_atomic

if TYPE_CHECKING:
    from niworkflows.engine.workflows import LiterateWorkflow

__all__ = [
    'CITATION_FILE',
    'citation_markdown',
    'methods_text',
    'package_version',
    'write_citation',
]

CITATION_FILE = Path('logs') / 'CITATION.md'
"""Where the methods text goes, relative to the output folder."""


def package_version(package: str) -> str:
    """The installed version of ``package`` for the methods text (``'unknown'`` if absent).

    >>> package_version('no-such-package-here')
    'unknown'
    """
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return 'unknown'


def methods_text(workflow: LiterateWorkflow) -> str:
    """The Markdown methods text of ``workflow``, each paragraph once.

    ``visit_desc`` drops a sub-workflow's text only when it equals one already
    collected; two participants with different images (one with a FLAIR, one
    without) give two different texts made of the same paragraphs, so repeated
    paragraphs are dropped here, keeping the first.
    """
    paragraphs = (block.strip() for block in workflow.visit_desc().split('\n\n'))
    return '\n\n'.join(dict.fromkeys(block for block in paragraphs if block)) + '\n'


def citation_markdown(workflow: LiterateWorkflow) -> str:
    """The content of ``logs/CITATION.md``: a Methods heading over :func:`methods_text`."""
    return '### Methods\n\n' + methods_text(workflow)


def write_citation(workflow: LiterateWorkflow, output_dir: str | os.PathLike[str]) -> Path:
    """Write ``<output_dir>/logs/CITATION.md`` (atomically) and return its path."""
    return write_text_atomic(Path(output_dir) / CITATION_FILE, citation_markdown(workflow))
