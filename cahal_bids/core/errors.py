"""Exceptions raised by cahal-bids: each names the offending file or value."""

from __future__ import annotations

from os import PathLike


class CahalError(Exception):
    """Base class of every error cahal-bids raises on purpose."""


class InvalidImageError(CahalError, ValueError):
    """An image cannot be used: unreadable, malformed header, or unsupported content.

    The message always starts with the file name so a one-line report is enough
    to find the culprit.
    """

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        where = '<in-memory image>' if self.path is None else self.path
        super().__init__(f'{where}: {problem}')


class RoutingError(CahalError, ValueError):
    """Voxel sizes that cannot be routed to an expert (non-finite or non-positive)."""


class NotImplementedYetError(CahalError):
    """A command that this version does not provide yet (exit code 2)."""


class PreprocessingError(CahalError):
    """A preprocessing step (masks, denoising, bias correction, labels) failed on an image."""
