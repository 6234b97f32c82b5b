"""Build the project's container image once per test session, with buildah, and run it.

Shared by ``test_container_image.py`` and the Slurm array test: the image is built from
``containers/Dockerfile`` by ``containers/build-local.sh`` and run through its entry point
by ``containers/run-local.sh`` (what the README calls building and running it here).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / 'containers' / 'build-local.sh'
RUN = REPO / 'containers' / 'run-local.sh'
TAG = 'localhost/cahal-bids:test'
BUILD_TIMEOUT_S = 1500


@dataclass(frozen=True)
class LocalImage:
    """A built image and how to run it."""

    tag: str
    build_seconds: float

    def run(
        self,
        *arguments: str,
        volumes: tuple[str, ...] = (),
        user: str | None = None,
        entrypoint: str | None = None,
        timeout: float = 900,
    ) -> subprocess.CompletedProcess[str]:
        """``docker run --rm --network none -v ... IMAGE ARGUMENTS`` through run-local.sh."""
        command = [str(RUN)]
        for volume in volumes:
            command += ['-v', volume]
        if user is not None:
            command += ['--user', user]
        if entrypoint is not None:
            command += ['--entrypoint', entrypoint]
        command += [self.tag, *arguments]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )  # fmt: skip


def why_no_image() -> str | None:
    """Why this machine cannot build the image, or None when it can."""
    missing = [
        program for program in ('buildah', 'mmdebstrap', 'unshare') if not shutil.which(program)
    ]
    if missing:
        return f'{", ".join(missing)} not installed (make system-deps installs them as root)'
    if os.geteuid() != 0:
        return 'building with buildah (chroot isolation) needs root here'
    if not any(Path(os.environ.get('TORCH_WHEELS', '/opt/wheels')).glob('torch-*.whl')):
        return 'no torch wheel to build with (TORCH_WHEELS, default /opt/wheels)'
    templateflow = Path(
        os.environ.get('TEMPLATEFLOW_OFFLINE', REPO.parent / 'shared/data/templateflow')
    )
    if not (templateflow / 'tpl-MNI152NLin2009cAsym').is_dir():
        return f'no offline TemplateFlow home at {templateflow} (TEMPLATEFLOW_OFFLINE)'
    return None


def build_image() -> LocalImage:
    """Build (or skip with the reason) the image, once per test session; a failed build
    fails the caller, and a later caller tries again."""
    reason = why_no_image()
    if reason is not None:
        pytest.skip(reason)
    return _built_once()


@functools.cache
def _built_once() -> LocalImage:
    import time

    started = time.monotonic()
    result = subprocess.run(
        [str(BUILD), TAG], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return LocalImage(TAG, time.monotonic() - started)
