"""Template files read offline from ``TEMPLATEFLOW_HOME`` through TemplateFlow's own index.

cahal-bids never downloads at run time: the file must already be in the TemplateFlow
home (the container fetches it at build time). TemplateFlow's ``api.get`` would
download a missing file, and its module-level configuration fixes the home when
``templateflow`` is first imported; this module instead opens a TemplateFlow cache
on the home named by the environment at call time and only queries its index.
"""

from __future__ import annotations

import os
from pathlib import Path

from cahal_bids.core.errors import CahalError

__all__ = ['TemplateNotFoundError', 'templateflow_home', 'template_file']


class TemplateNotFoundError(CahalError):
    """The requested template file is not (or only as an empty placeholder) in the home."""


def templateflow_home() -> Path:
    """``TEMPLATEFLOW_HOME``, or TemplateFlow's default (``~/.cache/templateflow``)."""
    default = Path.home() / '.cache' / 'templateflow'
    return Path(os.environ.get('TEMPLATEFLOW_HOME', default)).expanduser()


def template_file(
    template: str,
    *,
    suffix: str = 'T1w',
    resolution: int | None = 1,
    desc: str | None = None,
) -> Path:
    """The one ``tpl-<template>`` file with these entities, found by TemplateFlow's index.

    ``desc=None`` asks for the file without a ``desc`` entity (the head image);
    ``resolution=None`` for a file without ``res``. Raises
    :class:`TemplateNotFoundError` naming the home when it is absent or empty.
    """
    from templateflow.conf.cache import CacheConfig, TemplateFlowCache

    home = templateflow_home()
    wanted = f'tpl-{template} {suffix} (res-{resolution}, desc-{desc})'
    if not home.is_dir():
        raise TemplateNotFoundError(f'{wanted}: TEMPLATEFLOW_HOME {home} does not exist')
    cache = TemplateFlowCache(config=CacheConfig(root=home, autoupdate=False))
    files = cache.layout.get(
        template=template,
        suffix=suffix,
        resolution=resolution,
        desc=desc,
        extension=['.nii.gz', '.nii'],
        return_type='filename',
    )
    found = [Path(name) for name in sorted(files) if Path(name).stat().st_size > 0]
    if not found:
        raise TemplateNotFoundError(
            f'{wanted}: not in TEMPLATEFLOW_HOME {home} (or only an empty placeholder)'
        )
    return found[0].resolve()
