"""The sha256 of a file, the one content fingerprint used for inputs, weights and caches.

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as folder:
...     path = pathlib.Path(folder, 'empty')
...     _ = path.write_bytes(b'')
...     file_sha256(path)[:16]
'e3b0c44298fc1c14'
"""

from __future__ import annotations

import hashlib
import os

__all__ = ['file_sha256']


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (:func:`hashlib.file_digest`, read in blocks)."""
    with open(path, 'rb') as stream:
        return hashlib.file_digest(stream, 'sha256').hexdigest()
