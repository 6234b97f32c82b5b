"""A corpus of bad inputs (generated here, never stored) through ``cahal-enhance``.

Every bad file gives a non-zero exit with one line on stderr that names the file and
the problem, and leaves nothing behind in the output folder; sane oddities (links,
spaces and non-ASCII names, a single-volume 4D image, an all-zero image) are processed.
"""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cahal_bids.cli import enhance
from cahal_bids.core.errors import CahalError
from cahal_bids.core.nifti import load_header, load_image
from cahal_bids.core.routing import route

from helpers import patch_nifti_header

LOW = (1.0, 1.0, 4.0)


def _truncated(make_nifti, tmp_path):
    path = make_nifti(shape=(12, 12, 6), zooms=LOW, name='truncated.nii.gz')
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return path, 'truncated'


def _not_gzip(make_nifti, tmp_path):
    path = make_nifti(shape=(12, 12, 6), zooms=LOW, name='plain.nii')
    target = tmp_path / 'not-gzip.nii.gz'
    target.write_bytes(path.read_bytes())
    return target, 'not a readable NIfTI'


def _wrong_magic(make_nifti, tmp_path):
    return make_nifti(zooms=LOW, name='magic.nii', header_edits={'magic': b'xyz'}), 'NIfTI'


def _zero_bytes(make_nifti, tmp_path):
    path = tmp_path / 'empty.nii.gz'
    path.write_bytes(b'')
    return path, 'empty'


def _nan_voxels(make_nifti, tmp_path):
    data = np.ones((12, 12, 6), dtype=np.float32)
    data[3, 3, 3] = np.nan
    return make_nifti(data=data, zooms=LOW, name='nan.nii.gz'), 'NaN'


def _inf_voxels(make_nifti, tmp_path):
    data = np.ones((12, 12, 6), dtype=np.float32)
    data[0, 0, 0] = np.inf
    return make_nifti(data=data, zooms=LOW, name='inf.nii.gz'), 'infinite'


def _two_dimensional(make_nifti, tmp_path):
    return make_nifti(shape=(12, 12), zooms=LOW, name='flat.nii.gz'), '2'


def _several_volumes(make_nifti, tmp_path):
    return make_nifti(shape=(12, 12, 6, 3), zooms=LOW, name='series.nii.gz'), 'volumes'


def _five_dimensional(make_nifti, tmp_path):
    return make_nifti(shape=(8, 8, 4, 1, 2), zooms=LOW, name='five.nii.gz'), '5D image'


def _zero_voxel_size(make_nifti, tmp_path):
    path = make_nifti(zooms=LOW, name='zero-size.nii.gz', qform_code=0,
                      header_edits={'srow_z': np.zeros(4)})  # fmt: skip
    return path, 'affine'


def _nan_affine(make_nifti, tmp_path):
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    affine[0, 3] = np.nan
    path = make_nifti(affine=np.diag([1.0, 1.0, 4.0, 1.0]), name='nan-affine.nii.gz',
                      qform_code=0, header_edits={'srow_x': affine[0]})  # fmt: skip
    return path, 'affine'


def _singular_affine(make_nifti, tmp_path):
    affine = np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 4, 0], [0, 0, 0, 1]])
    return make_nifti(affine=affine, qform_code=0, name='singular.nii.gz'), 'singular'


def _complex(make_nifti, tmp_path):
    data = np.ones((8, 8, 4), dtype=np.complex64)
    return make_nifti(data=data, zooms=LOW, dtype=np.complex64, name='complex.nii.gz'), 'complex'


def _unreadable(make_nifti, tmp_path):
    if os.geteuid() == 0:
        pytest.skip('root reads any file')
    path = make_nifti(zooms=LOW, name='locked.nii.gz')
    path.chmod(0)
    return path, 'permission'


BAD = [
    _truncated, _not_gzip, _wrong_magic, _zero_bytes, _nan_voxels, _inf_voxels,
    _two_dimensional, _several_volumes, _five_dimensional, _zero_voxel_size, _nan_affine,
    _singular_affine, _complex, _unreadable,
]  # fmt: skip


@pytest.mark.parametrize('make_bad', BAD, ids=[f.__name__.strip('_') for f in BAD])
def test_bad_input_fails_clearly_and_leaves_nothing(
    make_bad, make_nifti, make_zoo, tmp_path, capsys
):
    zoo = make_zoo(levels=2, initial_filters=2)
    path, words = make_bad(make_nifti, tmp_path)
    out = tmp_path / 'out'
    out.mkdir()
    status = enhance.main([str(path), str(out / 'enhanced.nii.gz'), '--zoo', str(zoo)])
    assert status != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert path.name in err
    assert words.lower() in err.lower(), err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize('name', ['with space.nii.gz', 'ñandú_é.nii.gz', 'link'])
def test_odd_but_sane_inputs_are_processed(name, make_nifti, make_zoo, tmp_path):
    zoo = make_zoo(levels=2, initial_filters=2)
    if name == 'link':
        target = make_nifti(shape=(12, 12, 4), zooms=LOW, name='target.nii.gz')
        path = tmp_path / 'link.nii.gz'
        path.symlink_to(target)
    else:
        path = make_nifti(shape=(12, 12, 4), zooms=LOW, name=name)
    out = tmp_path / 'out' / f'{name.split(".")[0]} enhanced.nii.gz'
    assert enhance.main([str(path), str(out), '--zoo', str(zoo)]) == 0
    assert load_image(out).shape == (12, 12, 16)


def test_all_zero_and_single_volume_4d_are_processed(make_nifti, make_zoo, tmp_path):
    zoo = make_zoo(levels=2, initial_filters=2)
    zero = make_nifti(data=np.zeros((12, 12, 4)), zooms=LOW, name='zero.nii.gz')
    single = make_nifti(shape=(12, 12, 4, 1), zooms=LOW, name='single.nii.gz')
    for path in (zero, single):
        out = tmp_path / f'{path.name}-out.nii.gz'
        assert enhance.main([str(path), str(out), '--zoo', str(zoo)]) == 0
        assert np.all(np.isfinite(load_image(out).data))


def test_read_only_output_folder_fails_clearly(make_nifti, make_zoo, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip('root writes into read-only folders')
    zoo = make_zoo(levels=2, initial_filters=2)
    path = make_nifti(shape=(12, 12, 4), zooms=LOW)
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert enhance.main([str(path), str(locked / 'o.nii.gz'), '--zoo', str(zoo)]) == 1
        assert 'locked' in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_output_into_a_file_path_fails_clearly(make_nifti, make_zoo, tmp_path, capsys):
    zoo = make_zoo(levels=2, initial_filters=2)
    path = make_nifti(shape=(12, 12, 4), zooms=LOW)
    blocker = tmp_path / 'blocker'
    blocker.write_text('a file where a folder is needed')
    status = enhance.main([str(path), str(blocker / 'o.nii.gz'), '--zoo', str(zoo)])
    assert status != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'blocker' in err


_FINITE_OR_NAN = st.one_of(st.floats(-1e6, 1e6), st.just(float('nan')))
_WILD = {
    'pixdim': st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0)),
        min_size=8,
        max_size=8,
    ),
    'qform_code': st.integers(-5, 5),
    'sform_code': st.integers(-5, 5),
    'srow_x': st.lists(_FINITE_OR_NAN, min_size=4, max_size=4),
    'srow_z': st.lists(_FINITE_OR_NAN, min_size=4, max_size=4),
    'quatern_b': st.one_of(st.floats(-2, 2), st.just(float('nan'))),
    'scl_slope': st.floats(allow_nan=True, allow_infinity=True),
}
"""Anything a header field can hold: most of these values make the file unusable."""
_SANE = {
    'pixdim': st.lists(st.floats(0.5, 8.0), min_size=8, max_size=8),
    'qform_code': st.integers(0, 4),
    'sform_code': st.integers(0, 4),
    'srow_x': st.tuples(st.floats(0.5, 8.0), st.just(0.0), st.just(0.0), st.floats(-99, 99)),
    'srow_z': st.tuples(st.just(0.0), st.just(0.0), st.floats(0.5, 8.0), st.floats(-99, 99)),
    'quatern_b': st.floats(-0.9, 0.9),
    'scl_slope': st.one_of(st.just(float('nan')), st.floats(0.01, 100.0)),
}
"""Values a valid header may hold, so that the headers with few wild fields load."""
HEADER_FIELDS = st.sets(st.sampled_from(sorted(_WILD))).flatmap(
    lambda wild: st.fixed_dictionaries(
        {name: (_WILD if name in wild else _SANE)[name] for name in _WILD}
    )
)
"""Header fields of which any subset is wild and the rest sane."""


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(fields=HEADER_FIELDS)
def test_fuzzed_headers_load_or_fail_with_a_cahal_error(fields, make_nifti):
    path = make_nifti(shape=(6, 6, 3), zooms=LOW, name='fuzz.nii')
    written = np.asanyarray(nib.load(path).dataobj).copy()
    patch_nifti_header(path, **{k: np.asarray(v) for k, v in fields.items()})
    try:
        header = load_header(path)
        image = load_image(path)
    except CahalError as error:
        assert str(path) in str(error) or path.name in str(error)
        event('refused')
        return
    # a header that loads keeps the loader's promises: the header and the image agree, and
    # the voxel sizes are those of a finite, non-singular affine chosen by the documented rule
    assert image.shape == header.shape == (6, 6, 3)
    np.testing.assert_array_equal(image.affine, header.affine)
    assert image.voxel_sizes == header.voxel_sizes
    assert np.all(np.isfinite(header.affine)) and abs(np.linalg.det(header.affine[:3, :3])) > 0
    np.testing.assert_allclose(header.voxel_sizes, np.linalg.norm(header.affine[:3, :3], axis=0))
    if int(header.header['sform_code']) > 0:  # the sform wins, fuzzed rows and all
        event('loaded through the sform')
        np.testing.assert_array_equal(header.affine[0], np.float32(fields['srow_x']))
        np.testing.assert_array_equal(header.affine[2], np.float32(fields['srow_z']))
    else:  # qform or pixdim alone: the voxel sizes are the fuzzed pixdim
        np.testing.assert_allclose(
            header.voxel_sizes, np.float32(fields['pixdim'][1:4]), rtol=1e-6
        )
        event('loaded through the qform or pixdim')
        if int(header.header['qform_code']) <= 0:
            assert any('neither qform nor sform' in warning for warning in header.warnings)
    # the voxels are the written ones, scaled only by a usable scl_slope
    slope = float(np.float32(fields['scl_slope']))
    scale = slope if np.isfinite(slope) and slope != 0 else 1.0
    np.testing.assert_allclose(image.data, written * scale, rtol=1e-6)
    route(header.voxel_sizes)  # and routing takes them (a RoutingError here fails the test)


def test_images_too_large_for_memory_are_refused_from_the_header(make_nifti, make_zoo, capsys):
    zoo = make_zoo(levels=2, initial_filters=2)
    huge = make_nifti(shape=(8, 8, 4), zooms=LOW, name='huge.nii.gz',
                      header_edits={'dim': [3, 4000, 4000, 4000, 1, 1, 1, 1]})  # fmt: skip
    with pytest.raises(CahalError, match='too large'):
        load_image(huge)
    # a small file whose voxels are 1 m thick would ask for an absurd 1 mm output grid
    wide = make_nifti(shape=(8, 8, 4), zooms=(1000.0, 1000.0, 1000.0), name='wide.nii.gz')
    out = wide.parent / 'wide-out.nii.gz'
    assert enhance.main([str(wide), str(out), '--zoo', str(zoo)]) == 1
    err = capsys.readouterr().err
    assert 'output grid' in err and 'GiB' in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (root only): writes of more than that fail with ENOSPC."""
    import shutil
    import subprocess

    folder = tmp_path / 'full'
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which('mount') is None:
        pytest.skip('mounting a small tmpfs needs root')
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(folder)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.strip()}')
    try:
        yield folder
    finally:
        subprocess.run(['umount', str(folder)], check=False)


def test_a_full_output_disk_fails_clearly_and_leaves_nothing(
    full_disk, make_nifti, make_zoo, capsys
):
    zoo = make_zoo(levels=2, initial_filters=2)
    data = np.random.default_rng(0).random((64, 64, 16)).astype(np.float32)
    path = make_nifti(data=data, zooms=LOW, name='big.nii.gz')  # 1 mm output: ~1 MiB
    status = enhance.main([str(path), str(full_disk / 'out.nii.gz'), '--zoo', str(zoo)])
    assert status == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'out.nii.gz' in err, err
    assert 'space' in err.lower(), err
    assert list(full_disk.iterdir()) == []
