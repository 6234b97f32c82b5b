"""The Python API: ``from cahal_bids import Enhancer``, images in memory, and the Nipype
node's cache key following the zoo's content."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import cahal_bids
from cahal_bids.core.errors import InvalidImageError
from cahal_bids.core.nifti import write_image
from cahal_bids.engine.zoo import Zoo, ZooError, default_zoo_path

from helpers import write_test_zoo

pytestmark = pytest.mark.usefixtures('one_thread')

THICK = (1.0, 1.0, 4.0)
SHAPE = (40, 48, 12)
HEAVY = ('torch', 'nibabel', 'nipype', 'scipy', 'numpy')


def _image(shape=SHAPE, zooms=THICK, *, seed=0, data=None) -> nib.Nifti1Image:
    """A small synthetic in-memory image, never written to disk."""
    if data is None:
        data = np.random.default_rng(seed).random(shape).astype(np.float32) * 100
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(data.shape[:3]) - 1) * np.asarray(zooms)
    return nib.Nifti1Image(data, affine)


# --- import ---------------------------------------------------------------------------


def test_importing_the_package_and_its_api_names_is_cheap():
    """``import cahal_bids`` imports nothing heavy; the API names import the engine
    lazily, and even then torch, nibabel and Nipype wait until an image is enhanced."""
    script = (
        'import sys\n'
        'import cahal_bids\n'
        f'print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n'
        'from cahal_bids import Enhancer, EnhancedImage, Zoo\n'
        f'print(sorted(m for m in {HEAVY[:3]!r} if m in sys.modules))\n'
        'print(Enhancer.__module__, EnhancedImage.__module__, Zoo.__module__)\n'
    )
    result = subprocess.run(
        [sys.executable, '-c', script], capture_output=True, text=True, check=True, timeout=120
    )
    bare, with_api, modules = result.stdout.splitlines()
    assert bare == '[]'
    assert with_api == '[]'
    assert (
        modules == 'cahal_bids.engine.inference cahal_bids.engine.inference cahal_bids.engine.zoo'
    )


def test_every_public_name_resolves():
    for name in cahal_bids.__all__:
        assert getattr(cahal_bids, name) is not None, name
    assert set(cahal_bids.__all__) <= set(dir(cahal_bids))
    assert isinstance(cahal_bids.__version__, str)
    with pytest.raises(AttributeError, match='no attribute'):
        _ = cahal_bids.NoSuchThing


# --- opening a zoo --------------------------------------------------------------------


@pytest.mark.parametrize('modality', ['T1w', 'FLAIR'])
def test_a_modality_name_opens_the_shipped_zoo(modality):
    try:
        shipped = default_zoo_path(modality)
    except ZooError as error:
        pytest.skip(str(error))
    enhancer = cahal_bids.Enhancer(zoo=modality, device='cpu', precision='fp32')
    assert enhancer.zoo.path == shipped
    assert enhancer.zoo.modality == 'T1w'  # the route table sends FLAIR to the T1w zoo
    assert enhancer.device == torch.device('cpu')
    assert enhancer.contrast == modality


def test_t2w_opens_the_shipped_t2w_zoo_and_a_t1w_zoo_serves_flair(make_nifti, make_zoo):
    try:
        shipped = default_zoo_path('T2w')
    except ZooError as error:
        pytest.skip(str(error))
    enhancer = cahal_bids.Enhancer(zoo='T2w', device='cpu', precision='fp32')
    assert enhancer.zoo.path == shipped and enhancer.zoo.modality == 'T2w'
    assert enhancer.contrast == 'T2w'
    # an opened zoo serves its own modality unless told otherwise
    t1w = make_zoo('zoo', cells=['V4A1'])
    assert cahal_bids.Enhancer(t1w, device='cpu').contrast == 'T1w'
    image = nib.load(make_nifti(shape=(12, 10, 5), zooms=(1.0, 1.0, 4.0)))
    result = cahal_bids.Enhancer(t1w, device='cpu', contrast='FLAIR').enhance(image)
    assert result.provenance['route'] == 'FLAIR' and result.provenance['zoo']['modality'] == 'T1w'
    # the route table lends the T1w zoo to FLAIR, not to T2w, which has a zoo of its own
    with pytest.raises(ZooError, match='trained for T1w, not T2w'):
        cahal_bids.Enhancer(t1w, device='cpu', contrast='T2w')
    flair = make_zoo('flair', cells=['V4A1'], modality='FLAIR')
    with pytest.raises(ZooError, match='trained for FLAIR, not T2w'):
        cahal_bids.Enhancer(flair, device='cpu', contrast='T2w')


def test_a_path_or_an_opened_zoo(make_zoo):
    folder = make_zoo('zoo', cells=['V4A1'])
    by_text = cahal_bids.Enhancer(str(folder), device='cpu')
    by_path = cahal_bids.Enhancer(folder, device=torch.device('cpu'))
    opened = Zoo.open(folder)
    as_is = cahal_bids.Enhancer(opened, device='cpu')
    assert by_text.zoo.path == by_path.zoo.path == folder
    assert as_is.zoo is opened
    # the way of the earlier releases still works
    assert cahal_bids.Enhancer(opened, device=cahal_bids.resolve_device('cpu')).zoo is opened
    with pytest.raises(ZooError, match='not found'):
        cahal_bids.Enhancer(folder.parent / 'absent', device='cpu')
    with pytest.raises(TypeError, match='zoo must be'):
        cahal_bids.Enhancer(42, device='cpu')  # type: ignore[arg-type]
    with pytest.raises(cahal_bids.CahalError, match='unknown device'):
        cahal_bids.Enhancer(opened, device='tpu')


# --- enhancing in memory --------------------------------------------------------------


def test_in_memory_output_is_what_enhance_file_writes(tmp_path, make_zoo):
    enhancer = cahal_bids.Enhancer(make_zoo('zoo', cells=['V4A1']), device='cpu')
    image = _image()
    result = enhancer.enhance(image)
    assert isinstance(result, cahal_bids.EnhancedImage)
    assert not result.skipped and result.skip_reason is None
    assert result.image.shape == (40, 48, 48)
    np.testing.assert_allclose(result.image.header.get_zooms(), (1.0, 1.0, 1.0))

    source = tmp_path / 'thick.nii.gz'
    nib.save(image, source)
    written = enhancer.enhance_file(source, tmp_path / 'restored.nii.gz')
    on_disk = nib.load(written.output_path)
    np.testing.assert_array_equal(np.asarray(result.image.dataobj), np.asarray(on_disk.dataobj))
    np.testing.assert_array_equal(result.image.affine, on_disk.affine)
    # the same image gives the same bytes when written
    write_image(result.image, tmp_path / 'from-memory.nii.gz')
    assert (tmp_path / 'from-memory.nii.gz').read_bytes() == written.output_path.read_bytes()

    # the provenance is the sidecar, but for what identifies the input and the timing
    provenance, sidecar = dict(result.provenance), json.loads(written.sidecar_path.read_text())
    assert provenance.pop('input') is None and sidecar.pop('input') == str(source)
    assert (
        provenance.pop('input_hashed')
        == 'sha256 of the NIfTI header block, then of the float32 voxels in C order'
    )
    assert len(provenance.pop('input_sha256')) == len(sidecar.pop('input_sha256')) == 64
    del provenance['seconds'], sidecar['seconds']
    assert provenance == sidecar
    assert provenance['cell'] == 'V4A1' and provenance['expert']['cell'] == 'V4A1'


def test_the_in_memory_hash_follows_the_voxels_and_the_header(make_zoo):
    enhancer = cahal_bids.Enhancer(make_zoo('zoo', cells=['V4A1']), device='cpu')
    small = (24, 20, 6)
    first = enhancer.enhance(_image(small)).provenance['input_sha256']
    assert enhancer.enhance(_image(small)).provenance['input_sha256'] == first
    assert enhancer.enhance(_image(small, seed=1)).provenance['input_sha256'] != first
    shifted = _image(small)
    shifted.header.set_xyzt_units(xyz='mm', t='sec')
    assert enhancer.enhance(shifted).provenance['input_sha256'] != first


def test_an_image_already_at_one_millimetre_comes_back_unchanged(make_zoo):
    enhancer = cahal_bids.Enhancer(make_zoo('zoo', cells=['V4A1']), device='cpu')
    data = np.random.default_rng(2).integers(0, 1000, (20, 18, 16)).astype(np.int16)
    image = _image(zooms=(0.9, 0.9, 1.0), data=data)
    result = enhancer.enhance(image)
    assert result.skipped and result.provenance['skipped'] is True
    assert result.provenance['expert'] is None and result.provenance['cell'] is None
    assert 'already at 1 mm or finer' in result.skip_reason
    assert '0.9 x 0.9 x 1 mm' in result.skip_reason
    assert result.image.shape == image.shape
    np.testing.assert_allclose(result.image.affine, image.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(result.image.dataobj), data.astype(np.float32))


def _nan_voxels():
    data = np.ones((12, 12, 6), dtype=np.float32)
    data[3, 3, 3] = np.nan
    return _image(data=data)


def _several_volumes():
    return _image(data=np.ones((12, 12, 6, 3), dtype=np.float32))


def _zero_pixdim():
    image = _image((12, 12, 6))
    image.header['pixdim'][3] = 0.0
    return image


def _zero_affine_column():
    """As read from a file whose sform has no length along the slices (no qform)."""
    image = _image((12, 12, 6))
    image.set_qform(None, code=0)
    raw = bytearray(image.to_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)), check=False)
    header['srow_z'] = np.zeros(4)
    raw[: len(header.binaryblock)] = header.binaryblock
    return nib.Nifti1Image.from_bytes(bytes(raw))


INVALID = {
    'nan-voxels': (_nan_voxels, 'NaN'),
    'several-volumes': (_several_volumes, '3 volumes'),
    'zero-pixdim': (_zero_pixdim, 'must be finite and > 0'),
    'zero-voxel-size': (_zero_affine_column, 'must be > 0'),
}


@pytest.mark.parametrize('case', INVALID, ids=list(INVALID))
def test_invalid_images_fail_in_memory_as_they_fail_from_a_file(case, tmp_path, make_zoo):
    make, words = INVALID[case]
    enhancer = cahal_bids.Enhancer(make_zoo('zoo', cells=['V4A1']), device='cpu')
    with pytest.raises(InvalidImageError) as in_memory:
        enhancer.enhance(make())
    source = tmp_path / f'{case}.nii'
    nib.save(make(), source)
    with pytest.raises(InvalidImageError) as from_file:
        enhancer.enhance_file(source, tmp_path / 'out.nii.gz')
    assert in_memory.value.path is None and str(in_memory.value).startswith('<in-memory image>')
    assert from_file.value.path == str(source)
    assert in_memory.value.problem == from_file.value.problem
    assert words in in_memory.value.problem
    assert not (tmp_path / 'out.nii.gz').exists()


def test_only_nifti_images_are_accepted(make_zoo):
    enhancer = cahal_bids.Enhancer(make_zoo('zoo', cells=['V4A1']), device='cpu')
    with pytest.raises(InvalidImageError, match='got ndarray'):
        enhancer.enhance(np.ones(SHAPE, dtype=np.float32))  # type: ignore[arg-type]
    analyze = nib.AnalyzeImage(np.ones(SHAPE, dtype=np.float32), np.diag([*THICK, 1.0]))
    with pytest.raises(InvalidImageError, match='got AnalyzeImage'):
        enhancer.enhance(analyze)  # type: ignore[arg-type]


def test_a_nifti2_image_is_enhanced_like_a_nifti1(make_zoo):
    enhancer = cahal_bids.Enhancer(make_zoo('zoo', cells=['V4A1']), device='cpu')
    small = (24, 20, 6)
    one = _image(small)
    two = nib.Nifti2Image(np.asarray(one.dataobj), one.affine)
    np.testing.assert_array_equal(
        np.asarray(enhancer.enhance(one).image.dataobj),
        np.asarray(enhancer.enhance(two).image.dataobj),
    )


# --- the Nipype node: its cache key is the zoo's content, not its path -----------------


def _enhance_node(zoo, in_file, base_dir):
    from cahal_bids.app.workflows.enhance import init_enhance_wf

    workflow = init_enhance_wf(
        modality='T1w', denoise=False, device='cpu', zoo=str(zoo), omp_nthreads=1
    )
    node = workflow.get_node('enhance')
    node.inputs.in_file = str(in_file)
    node.base_dir = str(base_dir)
    return node


def test_replacing_the_weights_in_place_reruns_the_node(tmp_path):
    write_zoo = write_test_zoo
    zoo = write_zoo(tmp_path / 'zoo', cells=['V4A1'], seed=0)
    source = tmp_path / 'thick.nii.gz'
    nib.save(_image((24, 20, 6)), source)
    work = tmp_path / 'work'

    report_file = Path(_enhance_node(zoo, source, work).run().outputs.out_report)
    report = json.loads(report_file.read_text())
    assert report['expert']['sha256'] == Zoo.open(zoo).experts['V4A1']['sha256']
    written = report_file.stat().st_mtime_ns
    _enhance_node(zoo, source, work).run()  # unchanged zoo: the cached result is used
    assert report_file.stat().st_mtime_ns == written

    # the same content elsewhere has the same key: the path is not part of it
    moved = shutil.copytree(zoo, tmp_path / 'elsewhere' / 'zoo')
    key = _enhance_node(zoo, source, work).inputs.get_hashval(hash_method='content')[1]
    assert _enhance_node(moved, source, work).inputs.get_hashval(hash_method='content')[1] == key

    # new weights in the same folder (and the manifest that lists their sha256)
    write_zoo(zoo, cells=['V4A1'], seed=1)
    again = _enhance_node(zoo, source, work)
    assert again.inputs.get_hashval(hash_method='content')[1] != key
    rerun = json.loads(Path(again.run().outputs.out_report).read_text())
    assert rerun['expert']['sha256'] == Zoo.open(zoo).experts['V4A1']['sha256']
    assert rerun['expert']['sha256'] != report['expert']['sha256']


def test_the_node_refuses_a_manifest_of_another_zoo(tmp_path):
    from cahal_bids.app.interfaces.enhancement import CahalEnhance

    write_zoo = write_test_zoo
    zoo = write_zoo(tmp_path / 'zoo', cells=['V4A1'])
    other = write_zoo(tmp_path / 'other', cells=['V4A1'], seed=3)
    source = tmp_path / 'thick.nii.gz'
    nib.save(_image((24, 20, 6)), source)
    interface = CahalEnhance(
        in_file=str(source), zoo=str(zoo), zoo_manifest=str(other / 'manifest.json')
    )
    with pytest.raises(ValueError, match='is not the manifest of the zoo'):
        interface.run(cwd=str(tmp_path))
