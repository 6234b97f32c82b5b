"""The engine end to end: output grid, world alignment, tiling, determinism, sidecars."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from cahal_bids.cli import enhance
from cahal_bids.core.grid import native_grid
from cahal_bids.engine.inference import Enhancer, sidecar_path_for
from cahal_bids.engine.zoo import Zoo

pytestmark = pytest.mark.usefixtures('one_thread')


def _oblique_lps_affine(zooms, shift=(12.0, -30.0, 25.0), degrees=10.0):
    lps = np.diag([-1.0, -1.0, 1.0])
    theta = np.deg2rad(degrees)
    tilt = np.array(
        [[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = tilt @ lps @ np.diag(zooms)
    affine[:3, 3] = shift
    return affine


def _world_ramp(shape, affine):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), axis=-1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    return (100 + 0.8 * world[..., 0] - 0.5 * world[..., 1] + 1.3 * world[..., 2]).astype(
        np.float32
    )


def test_output_grid_and_world_alignment(tmp_path, make_nifti, make_zoo):
    """With identity experts the output is the trilinear input: a world ramp stays a ramp."""
    shape, zooms = (20, 18, 9), (0.9, 0.9, 4.0)
    affine = _oblique_lps_affine(zooms)
    source = make_nifti(shape=shape, affine=affine, data=_world_ramp(shape, affine))
    zoo = Zoo.open(make_zoo('identity', head_scale=0.0))
    result = Enhancer(zoo, device=torch.device('cpu')).enhance_file(
        source, tmp_path / 'out.nii.gz'
    )
    out = nib.load(result.output_path)
    expected = native_grid(shape, affine)
    assert out.shape == expected.shape == (18, 16, 36)
    np.testing.assert_allclose(out.affine, expected.affine, atol=1e-4)
    np.testing.assert_allclose(out.get_qform(), out.get_sform(), atol=1e-4)
    assert out.get_data_dtype() == np.float32
    # Interior voxels (away from clamped edges) reproduce the ramp at their world position.
    data = np.asarray(out.dataobj)
    ramp = _world_ramp(out.shape, out.affine)
    interior = (slice(2, -2), slice(2, -2), slice(4, -4))
    np.testing.assert_allclose(data[interior], ramp[interior], atol=0.1, rtol=0)
    # Sampling the output at the input's voxel centres gives back the input.
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    in_output = (world - out.affine[:3, 3]) @ np.linalg.inv(out.affine[:3, :3]).T
    sampled = map_coordinates(data, in_output.reshape(-1, 3).T, order=1, mode='nearest')
    original = _world_ramp(shape, affine).ravel()
    margin = np.array([2, 2, 4])  # clamped edges: within half a slice of the field of view
    inside = np.all(
        (in_output > margin) & (in_output < np.array(out.shape) - 1 - margin), axis=-1
    ).ravel()
    assert inside.sum() > 100
    np.testing.assert_allclose(sampled[inside], original[inside], atol=0.1)


def test_sidecar_records_every_decision(tmp_path, make_nifti, test_zoo):
    source = make_nifti(shape=(16, 14, 6), zooms=(1.0, 1.0, 5.0))
    zoo = Zoo.open(test_zoo)
    result = Enhancer(zoo, device=torch.device('cpu')).enhance_file(source, tmp_path / 'o.nii.gz')
    sidecar = json.loads(sidecar_path_for(result.output_path).read_text())
    assert sidecar == result.sidecar
    assert sidecar['input'] == str(source)
    assert len(sidecar['input_sha256']) == 64
    assert sidecar['cell'] == 'V5A1'
    assert sidecar['V'] == pytest.approx(5.0)
    assert sidecar['A'] == pytest.approx(0.2)
    assert sidecar['skipped'] is False
    assert sidecar['expert']['cell'] == 'V5A1'
    assert sidecar['expert']['sha256'] == zoo.experts['V5A1']['sha256']
    assert sidecar['expert']['substituted'] is False
    assert sidecar['zoo']['name'] == 'test-zoo'
    assert sidecar['zoo']['manifest_sha256'] == zoo.manifest_sha256
    assert sidecar['route'] == 'T1w'  # by default the zoo's own modality
    assert sidecar['device'] == 'cpu'
    assert sidecar['seconds'] > 0
    assert 'torch' in sidecar['software']
    assert sidecar['output_shape'] == [16, 14, 30]


def test_missing_expert_is_substituted_and_recorded(tmp_path, make_nifti, make_zoo):
    zoo = Zoo.open(make_zoo('partial', cells=['V1A3', 'V4A1']))
    source = make_nifti(shape=(16, 14, 6), zooms=(1.0, 1.0, 5.0))
    result = Enhancer(zoo, device=torch.device('cpu')).enhance_file(source, tmp_path / 'o.nii.gz')
    assert result.sidecar['cell'] == 'V5A1'
    assert result.sidecar['expert']['cell'] == 'V4A1'
    assert result.sidecar['expert']['requested_cell'] == 'V5A1'
    assert result.sidecar['expert']['substituted'] is True


def test_already_one_millimetre_is_written_unchanged(tmp_path, make_nifti, test_zoo):
    source = make_nifti(shape=(10, 9, 8), zooms=(0.9, 0.9, 1.0))
    result = Enhancer(Zoo.open(test_zoo), device=torch.device('cpu')).enhance_file(
        source, tmp_path / 'same.nii.gz'
    )
    before, after = nib.load(source), nib.load(result.output_path)
    assert after.shape == before.shape
    np.testing.assert_allclose(after.affine, before.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(after.dataobj), np.asarray(before.dataobj))
    assert result.sidecar['skipped'] is True
    assert result.sidecar['expert'] is None


@pytest.mark.parametrize(
    'norm_statistics',
    [None, {'method': 'patch-mean', 'patch_size': 16, 'patches': 3, 'seed': 0}],
    ids=['whole-volume', 'patch-mean'],
)
def test_tiled_equals_whole(tmp_path, make_nifti, make_zoo, norm_statistics):
    """Memory-aware tiling leaves no seams: tiled == whole within 1e-4 of the range."""
    zoo = Zoo.open(
        make_zoo('tiling', cells=['V4A1'], head_scale=0.3, norm_statistics=norm_statistics)
    )
    rng = np.random.default_rng(0)
    data = rng.random((40, 36, 11)).astype(np.float32) * 200
    source = make_nifti(data=data, zooms=(1.0, 1.0, 4.0))
    cpu = torch.device('cpu')
    whole = Enhancer(zoo, device=cpu, precision='fp32').enhance_file(source, tmp_path / 'w.nii.gz')
    tiled = Enhancer(zoo, device=cpu, tile_size=32, precision='fp32').enhance_file(
        source, tmp_path / 't.nii.gz'
    )
    assert whole.sidecar['tiled'] is False
    assert tiled.sidecar['tiled'] is True
    assert whole.sidecar['norm_statistics'] == zoo.norm_statistics
    a = np.asarray(nib.load(whole.output_path).dataobj)
    b = np.asarray(nib.load(tiled.output_path).dataobj)
    assert np.abs(a - a.mean()).max() > 0
    assert np.abs(a - b).max() <= 1e-4 * (a.max() - a.min())
    # bfloat16 tiles run too, and stay within bfloat16 rounding of the whole volume
    whole16 = Enhancer(zoo, device=cpu, precision='bf16').enhance_file(
        source, tmp_path / 'w16.nii'
    )
    tiled16 = Enhancer(zoo, device=cpu, tile_size=32, precision='bf16').enhance_file(
        source, tmp_path / 't16.nii'
    )
    c = np.asarray(nib.load(whole16.output_path).dataobj)
    d = np.asarray(nib.load(tiled16.output_path).dataobj)
    assert np.abs(c - d).max() <= 0.02 * (c.max() - c.min())


def test_a_thickest_last_zoo_restores_the_thick_axis_as_the_last_one(
    tmp_path, make_nifti, make_zoo
):
    """Slices along axis 0 through a thickest-last zoo == the same experts, as acquired,
    on the image transposed so that its slices run along axis 2."""
    options = dict(cells=['V4A1'], head_scale=0.3)
    plain = Zoo.open(make_zoo('plain', **options))
    reordered = Zoo.open(make_zoo('reordered', axis_order='thickest-last', **options))
    assert (plain.axis_order, reordered.axis_order) == ('as-acquired', 'thickest-last')
    data = np.random.default_rng(1).random((11, 40, 36)).astype(np.float32) * 200
    thick_first = make_nifti(data=data, zooms=(4.0, 1.0, 1.0), name='first.nii.gz')
    thick_last = make_nifti(data=data.transpose(1, 2, 0), zooms=(1.0, 1.0, 4.0), name='last.nii')
    cpu = torch.device('cpu')

    def restore(zoo, source, name):
        enhancer = Enhancer(zoo, device=cpu, precision='fp32', consistency_projection='off')
        result = enhancer.enhance_file(source, tmp_path / name)
        return np.asarray(nib.load(result.output_path).dataobj), result.sidecar

    reference, _ = restore(plain, thick_last, 'reference.nii')
    restored, sidecar = restore(reordered, thick_first, 'restored.nii')
    as_acquired, _ = restore(plain, thick_first, 'as_acquired.nii')
    assert sidecar['axis_order'] == 'thickest-last'
    assert restored.shape == as_acquired.shape == reference.transpose(2, 0, 1).shape
    span = reference.max() - reference.min()
    assert np.abs(restored.transpose(1, 2, 0) - reference).max() <= 1e-4 * span
    # the order matters: the same experts on the slices as acquired restore differently
    assert np.abs(as_acquired - restored).max() > 1e-2 * span


def test_deterministic_bytes(tmp_path, make_nifti, test_zoo):
    source = make_nifti(shape=(18, 16, 5), zooms=(1.0, 1.0, 4.5))
    zoo = Zoo.open(test_zoo)
    first = Enhancer(zoo, device=torch.device('cpu')).enhance_file(source, tmp_path / 'a.nii.gz')
    second = Enhancer(zoo, device=torch.device('cpu')).enhance_file(source, tmp_path / 'b.nii.gz')
    assert first.output_path.read_bytes() == second.output_path.read_bytes()


def test_cli_end_to_end(tmp_path, make_nifti, test_zoo, capsys):
    source = make_nifti(shape=(16, 14, 6), zooms=(1.0, 1.0, 3.0))
    out = tmp_path / 'nested' / 'enhanced.nii.gz'
    code = enhance.main(
        [str(source), str(out), '--zoo', str(test_zoo), '--quiet', '--threads', '1']
    )
    assert code == 0
    assert out.exists() and sidecar_path_for(out).exists()
    assert not any(p.name.startswith('.') for p in out.parent.iterdir())
    assert capsys.readouterr().err == ''


def test_cli_refuses_a_zoo_of_another_modality(tmp_path, make_nifti, make_zoo, capsys):
    source = make_nifti(shape=(16, 14, 6), zooms=(1.0, 1.0, 3.0))
    flair = make_zoo('flair', modality='FLAIR', cells=['V3A1'])
    code = enhance.main(
        [str(source), str(tmp_path / 'o.nii.gz'), '--zoo', str(flair), '--modality', 'T1w']
    )
    assert code == 2
    assert 'trained for FLAIR, not T1w' in capsys.readouterr().err


def test_cli_refuses_a_corrupted_zoo(tmp_path, make_nifti, test_zoo, capsys):
    (test_zoo / 'V3A2.safetensors').write_bytes(b'tampered')
    source = make_nifti(shape=(16, 14, 6), zooms=(1.0, 1.0, 3.0))
    code = enhance.main([str(source), str(tmp_path / 'o.nii.gz'), '--zoo', str(test_zoo)])
    assert code == 2
    err = capsys.readouterr().err
    assert 'V3A2.safetensors: sha256 does not match' in err
    assert not (tmp_path / 'o.nii.gz').exists()


def test_cli_processing_failure_exits_1(tmp_path, make_nifti, test_zoo, capsys):
    data = np.zeros((16, 14, 6), dtype=np.float32)
    data[0, 0, 0] = np.nan
    source = make_nifti(data=data, zooms=(1.0, 1.0, 3.0))
    code = enhance.main([str(source), str(tmp_path / 'o.nii.gz'), '--zoo', str(test_zoo)])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(source) in err
    assert not (tmp_path / 'o.nii.gz').exists()


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_clinical_flairs_line_up(tmp_path, shared_data, make_zoo):
    """Every real thick-slice FLAIR: output on its native grid, aligned with the input."""
    zoo = Zoo.open(make_zoo('identity', head_scale=0.0))
    enhancer = Enhancer(zoo, device=torch.device('cpu'))
    sources = sorted((shared_data / 'lr-clinical').rglob('*_FLAIR.nii.gz'))
    assert len(sources) == 11
    for source in sources:
        result = enhancer.enhance_file(source, tmp_path / source.name)
        image = nib.load(source)
        out = nib.load(result.output_path)
        expected = native_grid(image.shape[:3], result_affine := image.affine)
        assert out.shape == expected.shape
        np.testing.assert_allclose(out.affine, expected.affine, atol=1e-3)
        # Sample the output at input voxel centres of the central slab and compare.
        data = np.asarray(out.dataobj)
        inp = np.asarray(image.dataobj, dtype=np.float32)
        k = image.shape[2] // 2
        index = np.stack(
            np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), [k], indexing='ij'),
            -1,
        ).reshape(-1, 3)
        world = index @ result_affine[:3, :3].T + result_affine[:3, 3]
        position = (world - out.affine[:3, 3]) @ np.linalg.inv(out.affine[:3, :3]).T
        sampled = map_coordinates(data, position.T, order=1, mode='nearest')
        reference = inp[index[:, 0], index[:, 1], index[:, 2]]
        assert np.corrcoef(sampled, reference)[0, 1] > 0.97, source.name


@pytest.mark.shared_data
@pytest.mark.slow
def test_degraded_high_resolution_lines_up_with_its_ground_truth(tmp_path, shared_data, make_zoo):
    """A real 1 mm scan, degraded to 1 x 1 x 5 mm: the output lands on the truth's own grid."""
    from cahal_bids.core.grid import low_resolution_affine
    from cahal_bids.core.nifti import load_image, save_image
    from cahal_bids.physics.degradation import degrade

    truth = load_image(shared_data / 'hr' / 'sub-stroke01' / 'anat' / 'sub-stroke01_T1w.nii.gz')
    resolution = (1.0, 5.0, 1.0)
    _, low = degrade(torch.from_numpy(truth.data), resolution, return_low_resolution=True)
    source = save_image(
        low.numpy(), low_resolution_affine(truth.affine, resolution), tmp_path / 'lr.nii.gz'
    )
    zoo = Zoo.open(make_zoo('identity', head_scale=0.0))
    enhancer = Enhancer(zoo, device=torch.device('cpu'), consistency_projection='off')
    result = enhancer.enhance_file(source, tmp_path / 'sr.nii.gz')
    assert result.sidecar['cell'] == 'V5A1'
    out = nib.load(result.output_path)
    np.testing.assert_allclose(out.affine, truth.affine, atol=1e-3)
    n = truth.shape
    assert all(o >= t for o, t in zip(out.shape, n, strict=True))
    restored = np.asarray(out.dataobj)[: n[0], : n[1], : n[2]]
    # an identity expert returns its input: exactly the physics model's trilinear image
    expected = degrade(torch.from_numpy(truth.data), resolution).numpy()
    np.testing.assert_allclose(restored, expected, atol=1e-4 * float(truth.data.max()))
    mask = truth.data > 0.1 * truth.data.max()
    assert np.corrcoef(restored[mask], truth.data[mask])[0, 1] > 0.9


def test_bf16_stays_close_to_fp32(tmp_path, make_nifti, make_zoo):
    zoo = Zoo.open(make_zoo('bf16', cells=['V4A1'], head_scale=0.3))
    rng = np.random.default_rng(1)
    source = make_nifti(data=rng.random((24, 20, 6)).astype(np.float32) * 100, zooms=(1, 1, 4))
    full = Enhancer(zoo, device=torch.device('cpu'), precision='fp32').enhance_file(
        source, tmp_path / 'a.nii.gz'
    )
    assert full.sidecar['precision'] == 'fp32'
    half = Enhancer(zoo, device=torch.device('cpu'), precision='bf16').enhance_file(
        source, tmp_path / 'b.nii.gz'
    )
    assert half.sidecar['precision'] == 'bf16'
    a = np.asarray(nib.load(full.output_path).dataobj)
    b = np.asarray(nib.load(half.output_path).dataobj)
    assert np.abs(a - b).max() <= 0.02 * (a.max() - a.min())
    with pytest.raises(ValueError, match='precision'):
        Enhancer(zoo, device=torch.device('cpu'), precision='fp8')


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from cahal_bids.engine import devices

    cpu = torch.device('cpu')
    monkeypatch.setattr(devices, '_cpu_has_native_bf16', lambda: True)
    assert devices.resolve_precision('auto', cpu) == 'bf16'
    monkeypatch.setattr(devices, '_cpu_has_native_bf16', lambda: False)
    assert devices.resolve_precision('auto', cpu) == 'fp32'
    assert devices.resolve_precision('bf16', cpu) == 'bf16'
    assert devices.resolve_precision('fp32', cpu) == 'fp32'
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 0))
    assert devices.resolve_precision('auto', torch.device('cuda')) == 'fp32'
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    assert devices.resolve_precision('auto', torch.device('cuda')) == 'bf16'
    with pytest.raises(ValueError, match='precision'):
        devices.resolve_precision('fp16', cpu)
