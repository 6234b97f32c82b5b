"""Loading, validation and atomic saving of NIfTI images (cahal_bids.core.nifti)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cahal_bids.core import nifti
from cahal_bids.core.errors import InvalidImageError
from cahal_bids.core.nifti import LoadedHeader, LoadedImage, load_header, load_image, save_image


def _refused(path: Path, *words: str, header_too: bool = True) -> InvalidImageError:
    """Assert both loaders refuse ``path`` with its name and ``words`` in the message."""
    loaders = (load_header, load_image) if header_too else (load_image,)
    error = None
    for loader in loaders:
        with pytest.raises(InvalidImageError) as info:
            loader(path)
        error = info.value
        message = str(error)
        assert message.startswith(str(path)), message
        assert error.path == str(path)
        for word in words:
            assert word in message, message
    assert error is not None
    return error


# --- valid images ----------------------------------------------------------------------


@pytest.mark.parametrize('name', ['img.nii', 'img.nii.gz'])
@pytest.mark.parametrize('nifti2', [False, True])
def test_load_valid_image(make_nifti, name, nifti2):
    data = np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10)
    path = make_nifti(data=data, zooms=(1.0, 1.2, 3.0), name=name, nifti2=nifti2)
    image = load_image(path)
    assert isinstance(image, LoadedImage)
    assert isinstance(image.header, nib.Nifti2Header if nifti2 else nib.Nifti1Header)
    assert image.path == path
    assert image.shape == (8, 9, 10)
    assert image.data.dtype == np.float32
    assert image.data.flags.c_contiguous and image.data.flags.writeable
    assert not isinstance(image.data, np.memmap)
    np.testing.assert_array_equal(image.data, data)
    assert image.affine.dtype == np.float64 and image.affine.shape == (4, 4)
    assert not image.affine.flags.writeable
    np.testing.assert_allclose(image.voxel_sizes, (1.0, 1.2, 3.0), rtol=1e-6)
    assert image.warnings == ()
    assert image.source_dtype == 'float32'


def test_load_header_reads_no_voxels(make_nifti, monkeypatch):
    path = make_nifti(shape=(6, 7, 8), zooms=(0.9, 0.9, 4.0), dtype=np.int16)

    def forbidden(*args, **kwargs):
        raise AssertionError('load_header must not read voxel data')

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, '__array__', forbidden)
    header = load_header(path)
    assert type(header) is LoadedHeader
    assert header.shape == (6, 7, 8)
    assert header.source_dtype == 'int16'
    np.testing.assert_allclose(header.voxel_sizes, (0.9, 0.9, 4.0), rtol=1e-6)


def test_single_volume_4d_is_squeezed(make_nifti):
    path = make_nifti(shape=(5, 6, 7, 1))
    assert load_header(path).shape == (5, 6, 7)
    image = load_image(path)
    assert image.shape == image.data.shape == (5, 6, 7)


def test_voxel_sizes_are_affine_column_norms(make_nifti):
    angle = np.deg2rad(30)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.5, 4.0])
    affine[:3, 3] = (10, -20, 30)
    image = load_image(make_nifti(affine=affine))
    np.testing.assert_allclose(image.voxel_sizes, (0.8, 1.5, 4.0), rtol=1e-6)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)


def test_integer_data_with_scaling_is_scaled_to_float32(make_nifti):
    raw = np.arange(-100, 100, dtype=np.int16)[: 5 * 6 * 6].reshape(5, 6, 6)
    path = make_nifti(data=raw, dtype=np.int16, header_edits={'scl_slope': 2.0, 'scl_inter': 10.0})
    image = load_image(path)
    assert image.source_dtype == 'int16'
    assert image.data.dtype == np.float32
    np.testing.assert_array_equal(image.data, raw.astype(np.float32) * 2 + 10)


def test_uint8_without_scaling(make_nifti):
    raw = (np.arange(4 * 5 * 6) % 256).astype(np.uint8).reshape(4, 5, 6)
    image = load_image(make_nifti(data=raw, dtype=np.uint8, name='mask.nii'))
    np.testing.assert_array_equal(image.data, raw)


# --- qform and sform -------------------------------------------------------------------


def test_qform_sform_disagreement_warns_and_uses_sform(make_nifti):
    sform = np.diag([1.0, 1.0, 3.0, 1.0])
    qform = sform.copy()
    qform[:3, 3] = (0.0, 2.5, 0.0)
    path = make_nifti(affine=sform, qform_affine=qform)
    for loaded in (load_header(path), load_image(path)):
        np.testing.assert_allclose(loaded.affine, sform)
        assert len(loaded.warnings) == 1
        warning = loaded.warnings[0]
        assert str(path) in warning and 'sform' in warning and '2.5' in warning


def test_qform_sform_agreement_within_tolerance_is_silent(make_nifti):
    sform = np.diag([1.0, 1.0, 3.0, 1.0])
    qform = sform.copy()
    qform[0, 3] = 5e-4
    assert load_header(make_nifti(affine=sform, qform_affine=qform)).warnings == ()


def test_only_qform_is_used(make_nifti):
    qform = np.diag([-1.0, 2.0, 3.0, 1.0])
    qform[:3, 3] = (4.0, 5.0, 6.0)
    loaded = load_header(make_nifti(affine=qform, sform_code=0))
    np.testing.assert_allclose(loaded.affine, qform, atol=1e-6)
    assert loaded.warnings == ()


def test_neither_form_falls_back_with_warning(make_nifti):
    path = make_nifti(zooms=(2.0, 2.0, 2.0), qform_code=0, sform_code=0)
    loaded = load_header(path)
    assert len(loaded.warnings) == 1
    assert str(path) in loaded.warnings[0] and 'orientation unknown' in loaded.warnings[0]
    np.testing.assert_allclose(loaded.affine, loaded.header.get_base_affine())
    np.testing.assert_allclose(loaded.voxel_sizes, (2.0, 2.0, 2.0))


def test_pixdim_disagreeing_with_affine_warns(make_nifti):
    path = make_nifti(
        zooms=(1.0, 1.0, 3.0), qform_code=0, header_edits={'pixdim': [1, 1, 1, 2.5, 1, 0, 0, 0]}
    )
    loaded = load_header(path)
    assert loaded.voxel_sizes == pytest.approx((1.0, 1.0, 3.0))
    assert any('pixdim' in warning for warning in loaded.warnings)


# --- refused files ---------------------------------------------------------------------


def test_missing_file(tmp_path):
    _refused(tmp_path / 'absent.nii.gz', 'not found')


def test_directory(tmp_path):
    folder = tmp_path / 'folder.nii'
    folder.mkdir()
    _refused(folder, 'directory')


def test_wrong_extension(make_nifti):
    path = make_nifti(name='img.nii')
    renamed = path.rename(path.with_name('img.mgz'))
    _refused(renamed, 'unsupported file name')


def test_unreadable_file(make_nifti, monkeypatch):
    path = make_nifti()

    def denied(*args, **kwargs):
        raise PermissionError(13, 'Permission denied')

    monkeypatch.setattr(nifti, 'open', denied, raising=False)
    _refused(path, 'permission denied')


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root reads any file')
def test_unreadable_file_by_mode(make_nifti):
    path = make_nifti()
    path.chmod(0)
    try:
        _refused(path, 'permission denied')
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize('name', ['empty.nii', 'empty.nii.gz'])
def test_zero_byte_file(tmp_path, name):
    path = tmp_path / name
    path.touch()
    _refused(path, '0 bytes')


def test_truncated_gzip_data(make_nifti):
    path = make_nifti(shape=(16, 16, 16))
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    load_header(path)  # the header itself is intact
    _refused(path, 'truncated or corrupt', header_too=False)


def test_truncated_gzip_header(make_nifti):
    path = make_nifti()
    path.write_bytes(path.read_bytes()[:60])
    _refused(path, 'not a readable NIfTI')


def test_truncated_uncompressed_file_is_caught_from_the_header(make_nifti):
    path = make_nifti(name='img.nii')
    path.write_bytes(path.read_bytes()[:1000])
    _refused(path, 'truncated')


@pytest.mark.parametrize('name', ['junk.nii', 'junk.nii.gz'])
def test_garbage_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(1).bytes(2000))
    _refused(path, 'not a readable NIfTI')


def test_gzip_of_garbage(tmp_path):
    path = tmp_path / 'junk.nii.gz'
    path.write_bytes(gzip.compress(np.random.default_rng(2).bytes(2000)))
    _refused(path, 'not a readable NIfTI')


def test_wrong_magic(make_nifti):
    _refused(make_nifti(header_edits={'magic': b'xy1'}), 'not a readable NIfTI')


@pytest.mark.parametrize(
    ('shape', 'words'),
    [
        ((8, 9), ('2D', '(8, 9)')),
        ((4, 5, 6, 1, 2), ('5D', '(4, 5, 6, 1, 2)')),
        ((4, 5, 6, 3), ('3 volumes', '(4, 5, 6, 3)')),
        ((1, 5, 6), ('fewer than 2 voxels', 'axis 0')),
        ((5, 6, 1), ('fewer than 2 voxels', 'axis 2')),
    ],
)
def test_bad_shapes(make_nifti, shape, words):
    _refused(make_nifti(shape=shape), *words)


def test_nan_voxels_are_counted(make_nifti):
    data = np.ones((5, 6, 7), dtype=np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    _refused(make_nifti(data=data), '4 of 210 voxels', 'NaN', header_too=False)
    assert load_header(make_nifti(data=data, name='other.nii.gz')).shape == (5, 6, 7)


@pytest.mark.parametrize('value', [0.0, -2.0, np.nan, np.inf])
def test_bad_pixdim(make_nifti, value):
    path = make_nifti(header_edits={'pixdim': [1.0, 1.0, value, 3.0, 1.0, 0, 0, 0]})
    _refused(path, 'pixdim', 'finite and > 0')


def test_zero_affine_column(make_nifti):
    path = make_nifti(qform_code=0, header_edits={'srow_y': [0.0, 0.0, 0.0, 0.0]})
    _refused(path, 'column norms', '> 0')


def test_singular_affine(make_nifti):
    path = make_nifti(
        qform_code=0,
        header_edits={'srow_x': [1.0, 2.0, 0.0, 0.0], 'srow_y': [0.0, 0.0, 0.0, 0.0]},
    )
    _refused(path, 'singular affine')


def test_nearly_singular_affine(make_nifti):
    path = make_nifti(
        qform_code=0,
        header_edits={'srow_x': [1.0, 1.0, 0.0, 0.0], 'srow_y': [0.0, 1e-8, 0.0, 0.0]},
    )
    _refused(path, 'singular affine')


def test_non_finite_affine(make_nifti):
    path = make_nifti(qform_code=0, header_edits={'srow_z': [0.0, 0.0, 3.0, np.nan]})
    _refused(path, 'non-finite affine')


def test_invalid_quaternion(make_nifti):
    path = make_nifti(sform_code=0, header_edits={'quatern_b': 0.9, 'quatern_c': 0.9})
    _refused(path, 'not a readable NIfTI', 'w2')  # nibabel decodes the qform on load


def test_complex_dtype(make_nifti):
    data = np.ones((4, 5, 6), dtype=np.complex64)
    _refused(make_nifti(data=data, dtype=np.complex64), 'complex')


def test_rgb_dtype(make_nifti):
    rgb = np.dtype([('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
    data = np.zeros((4, 5, 6), dtype=rgb)
    _refused(make_nifti(data=data, dtype=rgb), 'RGB')


# --- saving ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['out.nii', 'out.nii.gz'])
def test_save_round_trip(tmp_path, name):
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (12.0, -3.0, 7.5)
    data = np.random.default_rng(3).random((4, 5, 6)).astype(np.float32)
    path = save_image(data, affine, tmp_path / name)
    assert path == tmp_path / name
    assert [entry.name for entry in tmp_path.iterdir()] == [name]
    image = load_image(path)
    np.testing.assert_array_equal(image.data, data)
    np.testing.assert_allclose(image.affine, affine)
    assert image.warnings == ()
    header = image.header
    assert int(header['qform_code']) == int(header['sform_code']) == 1
    assert header.get_xyzt_units()[0] == 'mm'
    assert (path.read_bytes()[:2] == b'\x1f\x8b') == name.endswith('.gz')


def test_save_copies_positive_codes(tmp_path, make_nifti):
    source = load_header(make_nifti(qform_code=0, sform_code=4))
    path = save_image(np.zeros((3, 3, 3)), np.eye(4), tmp_path / 'out.nii.gz', header_like=source)
    header = nib.load(path).header
    assert int(header['sform_code']) == 4
    assert int(header['qform_code']) == 1


def test_save_integer_rounds_and_clips(tmp_path):
    data = np.array([-3.6, 0.4, 2.5, 300.0] * 2, dtype=np.float32).reshape(2, 2, 2)
    path = save_image(data, np.eye(4), tmp_path / 'labels.nii.gz', dtype=np.uint8)
    image = nib.load(path)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj).ravel()[:4], [0, 0, 2, 255])

    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[1, 1, 1] = True
    path = save_image(mask, np.eye(4), tmp_path / 'mask.nii', dtype=np.uint8)
    np.testing.assert_array_equal(load_image(path).data, mask)
    path = save_image(mask.astype(np.int64), np.eye(4), tmp_path / 'big.nii', dtype=np.int64)
    assert load_image(path).source_dtype == 'int64'


def test_save_refuses_bad_input(tmp_path):
    with pytest.raises(InvalidImageError, match='out.mgz'):
        save_image(np.zeros((2, 2, 2)), np.eye(4), tmp_path / 'out.mgz')
    with pytest.raises(InvalidImageError, match='affine'):
        save_image(np.zeros((2, 2, 2)), np.full((4, 4), np.nan), tmp_path / 'out.nii')
    with pytest.raises(InvalidImageError, match='NaN'):
        save_image(np.full((2, 2, 2), np.nan), np.eye(4), tmp_path / 'out.nii', dtype=np.int16)
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    import cahal_bids.core.nifti as nifti_module

    target = tmp_path / 'out.nii.gz'
    target.write_bytes(b'previous content')
    real_write = nifti_module._write_nifti

    def failing_write(image, path, *, compressed):
        real_write(image, path, compressed=compressed)  # a complete temporary file exists ...
        raise OSError('disk full')  # ... when the write fails

    monkeypatch.setattr(nifti_module, '_write_nifti', failing_write)
    with pytest.raises(OSError, match='disk full'):
        save_image(np.ones((3, 3, 3)), np.eye(4), target)
    assert target.read_bytes() == b'previous content'
    assert [entry.name for entry in tmp_path.iterdir()] == ['out.nii.gz']

    monkeypatch.setattr(nifti_module, '_write_nifti', real_write)
    save_image(np.ones((3, 3, 3)), np.eye(4), target)
    assert load_image(target).shape == (3, 3, 3)
    assert [entry.name for entry in tmp_path.iterdir()] == ['out.nii.gz']


@pytest.mark.parametrize('name', ['out.nii.gz', 'out.nii'])
def test_saved_files_are_standard_and_reproducible(tmp_path, name):
    """The fast gzip writer gives files any gzip reader opens, byte-identical on rewrite."""
    import gzip

    data = np.random.default_rng(0).random((7, 8, 9)).astype(np.float32)
    first = save_image(data, np.diag([2.0, 1.0, 3.0, 1.0]), tmp_path / name)
    payload = first.read_bytes()
    raw = gzip.decompress(payload) if name.endswith('.gz') else payload
    assert nib.Nifti1Image.from_bytes(raw).get_fdata().tolist() == data.tolist()
    assert np.array_equal(load_image(first).data, data)
    (tmp_path / 'again').mkdir()
    second = save_image(data, np.diag([2.0, 1.0, 3.0, 1.0]), tmp_path / 'again' / name)
    assert second.read_bytes() == payload
