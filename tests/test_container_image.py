"""The container image, built from containers/Dockerfile and run as users run it.

Built with buildah by ``containers/build-local.sh`` (skipped, with the reason, where
buildah, mmdebstrap or root are missing: ``make system-deps`` installs the packages) and
run through its entry point, as its non-root user, with no network, the dataset mounted
read-only (``containers/run-local.sh``, the stand-in for ``docker run`` on this machine).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from container_image import LocalImage, build_image
from helpers import run_captured, write_app_assets

pytestmark = pytest.mark.slow

IMAGES = [
    ('sub-01/anat/sub-01_T1w.nii.gz', (1.0, 1.0, 4.0)),
    ('sub-01/anat/sub-01_FLAIR.nii.gz', (1.0, 1.0, 5.0)),
]
EXPECTED_DIFFERENCES = {
    '/CAHAL/software/python': "the image's Python (the local stand-in base has Debian's 3.11.2)",
    '/CAHAL/zoo/path': "where the zoo is: the container's mount point, this machine's folder",
    '/CAHAL/acquired_input': "where the raw input is: the container's mount point, this "
    "machine's folder",
}
"""Sidecar fields that may differ between the two runs, and why; nothing else may."""


@pytest.fixture(scope='module')
def image() -> LocalImage:
    return build_image()


@pytest.fixture(scope='module')
def assets(tmp_path_factory) -> dict[str, Path]:
    found = write_app_assets(tmp_path_factory.mktemp('container'), IMAGES)
    # readable by the image's user, as a dataset shared with docker -v is (pytest makes
    # its folders private to root)
    for path in [found['root'], *found['root'].rglob('*')]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return found


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (and the folders), by relative path."""
    found = {}
    for path in sorted(folder.rglob('*')):
        key = path.relative_to(folder).as_posix()
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else 'dir'
    return found


def _derivatives(out: Path) -> dict[str, object]:
    """Each derivative's bytes, or for JSON its content less the wall times."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != 'seconds'}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    content: dict[str, object] = {}
    for path in sorted(out.glob('sub-*/**/anat/*')):
        key = path.relative_to(out).as_posix()
        content[key] = (
            strip(json.loads(path.read_text())) if path.suffix == '.json' else path.read_bytes()
        )
    return content


def _differing_fields(first, second, path: str = '') -> list[str]:
    """The JSON paths (``/a/b``) where two decoded JSON documents differ."""
    if isinstance(first, dict) and isinstance(second, dict):
        return [
            found
            for key in sorted(set(first) | set(second))
            for found in _differing_fields(first.get(key), second.get(key), f'{path}/{key}')
        ]
    return [] if first == second else [path]


def _arguments(assets: dict[str, Path], *, data: str, out: str, work: str, root: str) -> list[str]:
    """The participant's command line with the dataset, outputs, work and assets at the
    given paths (the host's, or the container's mount points)."""
    relative = {
        key: assets[key].relative_to(assets['root'])
        for key in ('t1w_zoo', 'flair_zoo', 'template')
    }
    return [
        data, out, 'participant', '-w', work,
        '--zoo', f'{root}/{relative["t1w_zoo"]}', f'{root}/{relative["flair_zoo"]}',
        '--template-file', f'{root}/{relative["template"]}', '--template-name', 'Phantom',
        '--sloppy', '--nprocs', '1', '--random-seed', '7',
    ]  # fmt: skip


def test_version_and_help_through_the_entry_point(image):
    from cahal_bids import __version__

    version = image.run('--version')
    assert version.returncode == 0, version.stderr[-2000:]
    assert __version__ in version.stdout + version.stderr
    shown = image.run('--help')
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert 'participant' in shown.stdout and 'bids_dir' in shown.stdout.lower()


_SHIPPED_ZOOS_CHECK = """
from cahal_bids.engine.zoo import SHIPPED_ZOOS, Zoo, default_zoo_path
for route in SHIPPED_ZOOS:
    zoo = Zoo.open(default_zoo_path(route))  # every expert's sha256 checked
    print(route, zoo.name, zoo.version, zoo.manifest_sha256)
"""


def test_the_shipped_zoos_are_in_the_image_and_verify(image):
    from cahal_bids.engine.zoo import SHIPPED_ZOOS, Zoo, default_zoo_path

    result = image.run('-c', _SHIPPED_ZOOS_CHECK, entrypoint='python')
    assert result.returncode == 0, result.stderr[-3000:]
    inside = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines()}
    outside = {route: Zoo.open(default_zoo_path(route)).manifest_sha256 for route in SHIPPED_ZOOS}
    assert inside == outside


def test_a_participant_runs_inside_and_matches_the_same_run_outside(image, assets, tmp_path):
    root = assets['root']
    before = _tree(assets['bids'])
    out, work = tmp_path / 'out', tmp_path / 'work'
    for folder in (out, work):
        folder.mkdir()
        folder.chmod(0o777)  # the image's user (UID 1000) writes here, as with docker -v
    result = image.run(
        *_arguments(assets, data='/data', out='/out', work='/work', root='/assets'),
        volumes=(
            f'{assets["bids"]}:/data:ro', f'{out}:/out', f'{work}:/work', f'{root}:/assets:ro',
        ),
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert _tree(assets['bids']) == before, 'the container wrote into the dataset'
    owners = {path.stat().st_uid for path in out.rglob('*')}
    assert owners == {1000}, f'outputs owned by {owners}, not the image user 1000'
    inside = _derivatives(out)
    assert any(name.endswith('_desc-cahal_T1w.nii.gz') for name in inside), sorted(inside)
    assert any(name.endswith('_xfm.txt') for name in inside), sorted(inside)

    host_out, host_work = tmp_path / 'host-out', tmp_path / 'host-work'
    host = run_captured(
        [sys.executable, '-m', 'cahal_bids', *_arguments(
            assets, data=str(assets['bids']), out=str(host_out), work=str(host_work),
            root=str(root),
        )]
    )  # fmt: skip
    assert host.returncode == 0, host.stderr[-3000:]
    outside = _derivatives(host_out)
    assert sorted(inside) == sorted(outside)
    for name, expected in outside.items():
        if isinstance(expected, bytes):  # images and transforms: byte for byte
            assert inside[name] == expected, f'{name} differs inside the container'
        else:
            fields = set(_differing_fields(inside[name], expected))
            assert fields <= set(EXPECTED_DIFFERENCES), (name, fields - set(EXPECTED_DIFFERENCES))
