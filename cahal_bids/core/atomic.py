"""Atomic file writes: a reader sees the old file, or the new one whole, never a part.

Every writer of cahal-bids goes through here: the content is written to a hidden
temporary name in the destination folder, then renamed over the destination with
:func:`os.replace` (atomic on POSIX within one file system). On any error, including an
interruption, the temporary file is removed and the destination is left untouched.
New files get the ordinary permissions of the process (``0666`` minus the umask).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ['atomic_path', 'write_bytes_atomic', 'write_json_atomic', 'write_text_atomic']


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    The temporary name keeps the destination's suffixes (``.nii.gz`` stays
    ``.nii.gz``) so writers that choose a format from the name still work.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with atomic_path(folder / 'a.txt') as temporary:
    ...     _ = temporary.write_text('done')
    >>> (folder / 'a.txt').read_text(), sorted(p.name for p in folder.iterdir())
    ('done', ['a.txt'])
    """
    target = Path(path)
    suffix = ''.join(target.suffixes[-2:]) if target.name.endswith('.nii.gz') else target.suffix
    temporary = target.with_name(f'.{target.name}.{secrets.token_hex(6)}.tmp{suffix}')
    try:
        yield temporary
        if temporary.exists():
            os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically (creating its folder if needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_bytes(payload)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode('utf-8'))


def write_json_atomic(path: str | os.PathLike[str], content: Any, *, indent: int = 2) -> Path:
    """Write ``content`` as JSON (with a final newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(content, indent=indent) + '\n')
