#!/usr/bin/env python
"""Print the exact versions of cahal-bids's runtime dependencies, as installed here.

The container installs the cahal-bids wheel with these pins (``pip install --constraint``),
so an image built today and one built next year hold the same libraries. torch is left
out: the Dockerfile installs it first, from the wheel index chosen by ``TORCH_INDEX``
(CPU or a CUDA variant), at ``TORCH_VERSION``. Regenerate after changing the
dependencies in setup.cfg, from an up-to-date ``.venv``::

    .venv/bin/python containers/update_constraints.py > containers/constraints.txt
"""

from __future__ import annotations

import configparser
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SETUP_CFG = Path(__file__).resolve().parents[1] / 'setup.cfg'
INSTALLED_SEPARATELY = {'torch'}


def runtime_requirements(setup_cfg: Path = SETUP_CFG) -> list[Requirement]:
    """``install_requires`` of setup.cfg (no extras)."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    lines = parser['options']['install_requires'].strip().splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


def pinned_closure(requirements: list[Requirement]) -> dict[str, str]:
    """Installed version of every distribution the requirements pull in, transitively."""
    environment = {'extra': ''}
    versions: dict[str, str] = {}
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in versions:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            sys.exit(f'{requirement.name} is not installed here: run make venv first')
        versions[name] = distribution.version
        pending.extend(Requirement(text) for text in distribution.requires or [])
    return versions


def main() -> None:
    versions = pinned_closure(runtime_requirements())
    print('# Runtime dependencies of cahal-bids in the container, pinned (torch excluded: it is')
    print('# installed from TORCH_INDEX). Made by containers/update_constraints.py; do not edit.')
    for name in sorted(versions):
        if name not in INSTALLED_SEPARATELY:
            print(f'{name}=={versions[name]}')


if __name__ == '__main__':
    main()
