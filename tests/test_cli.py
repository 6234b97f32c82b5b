"""Console scripts: --help/--version everywhere, clear usage errors, the dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cahal_bids import __version__
from cahal_bids.cli import enhance, evaluate, run, train

SCRIPTS = {
    'cahal-bids': run,
    'cahal-enhance': enhance,
    'cahal-train': train,
    'cahal-eval': evaluate,
}
BIN = Path(sys.executable).parent


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_installed_script_version_and_help(script):
    executable = BIN / script
    assert executable.exists(), f'{script} is not installed next to {sys.executable}'
    version = subprocess.run(
        [str(executable), '--version'], capture_output=True, text=True, check=False
    )
    assert version.returncode == 0
    assert version.stdout.strip() == f'{script} {__version__}'
    usage = subprocess.run(
        [str(executable), '--help'], capture_output=True, text=True, check=False
    )
    assert usage.returncode == 0
    assert usage.stdout.startswith(f'usage: {script}')


def test_run_py_and_module_are_the_bids_app():
    root = Path(__file__).resolve().parents[1]
    for command in ([sys.executable, str(root / 'run.py')], [sys.executable, '-m', 'cahal_bids']):
        result = subprocess.run(
            [*command, '--version'], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0
        assert result.stdout.strip() == f'cahal-bids {__version__}'


def test_bids_app_on_a_missing_dataset_exits_2_with_a_reason(tmp_path, capsys):
    assert run.main([str(tmp_path / 'absent'), str(tmp_path / 'out'), 'participant']) == 2
    err = capsys.readouterr().err
    assert 'absent' in err and 'does not exist' in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(['/data'])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        enhance.main(['x.nii.gz', '--device', 'tpu'])
    assert exc.value.code == 2


PAPER_EXAMPLES = [
    ((1.0, 1.0, 5.0), 'V5A1', False),
    ((1.7, 1.7, 1.7), 'V5A3', False),
    ((1.0, 1.0, 3.0), 'V3A2', False),
    ((0.5, 0.5, 5.0), 'V5A1', False),
    ((0.9, 0.9, 0.9), None, True),
]


@pytest.mark.parametrize(('zooms', 'cell', 'skip'), PAPER_EXAMPLES)
def test_dry_run_reports_the_papers_examples(make_nifti, capsys, zooms, cell, skip):
    path = make_nifti(shape=(12, 10, 8), zooms=zooms)
    assert enhance.main([str(path), '--dry-run']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['cell'] == cell
    assert report['skip'] is skip
    assert report['input'] == str(path)
    assert report['shape'] == [12, 10, 8]
    assert report['voxel_sizes'] == pytest.approx(list(zooms))
    assert report['orientation'] == 'RAS'
    rounded = [int(np.floor(n * r + 0.5)) for n, r in zip((12, 10, 8), zooms, strict=True)]
    expected_shape = [12, 10, 8] if skip else rounded
    assert report['output_grid']['shape'] == expected_shape
    affine = np.array(report['output_grid']['affine'])
    assert affine.shape == (4, 4)
    if not skip:
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), 1.0)


def test_dry_run_on_an_oblique_lps_image(make_nifti, capsys):
    rotation = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    theta = np.deg2rad(12)
    tilt = np.array(
        [[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = tilt @ rotation @ np.diag([0.9, 0.9, 4.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    path = make_nifti(shape=(20, 18, 6), affine=affine)
    assert enhance.main([str(path), '--dry-run']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['cell'] == 'V4A1'
    out = np.array(report['output_grid']['affine'])
    corner_in = affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    corner_out = out @ np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(corner_out, corner_in, atol=1e-5)
    assert report['output_grid']['shape'] == [18, 16, 24]


def test_dry_run_bad_file_is_one_line_exit_1(tmp_path, capsys):
    bad = tmp_path / 'broken.nii.gz'
    bad.write_bytes(b'not a nifti at all')
    assert enhance.main([str(bad), '--dry-run']) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert 'broken.nii.gz' in err


def test_missing_input_is_a_usage_error(tmp_path, capsys):
    assert enhance.main([str(tmp_path / 'nope.nii.gz'), '--dry-run']) == 2
    assert 'nope.nii.gz: input file not found' in capsys.readouterr().err


def test_output_required_without_dry_run(make_nifti, capsys):
    path = make_nifti()
    assert enhance.main([str(path)]) == 2
    assert 'OUTPUT is required' in capsys.readouterr().err


def test_never_overwrites_its_input(make_nifti, capsys):
    path = make_nifti()
    before = path.read_bytes()
    assert enhance.main([str(path), str(path)]) == 2
    assert 'refusing to overwrite the input' in capsys.readouterr().err
    assert path.read_bytes() == before


def test_enhance_leaves_floating_point_state_alone(make_nifti, make_zoo, tmp_path):
    """In-process calls must not switch on flush-to-zero (it breaks other code's floats)."""
    source = make_nifti(shape=(12, 10, 5), zooms=(1.0, 1.0, 4.0))
    zoo = make_zoo('zoo', cells=['V4A1'])
    assert enhance.main([str(source), str(tmp_path / 'o.nii.gz'), '--zoo', str(zoo), '-q']) == 0
    assert np.nextafter(np.float32(0), np.float32(1)) * np.float32(1) > 0
    assert float(np.float64(5e-324) * 1.0) > 0


def test_train_fit_precision_defaults_to_auto_and_rejects_fp16(capsys):
    parser = train.build_parser()
    required = ['fit', '--cache-dir', 'prep', '--out', 'zoo', '--work-dir', 'runs']
    assert parser.parse_args(required).precision == 'auto'
    assert parser.parse_args([*required, '--precision', 'bf16']).precision == 'bf16'
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*required, '--precision', 'fp16'])
    assert exc.value.code == 2
    assert "'fp16'" in capsys.readouterr().err


def test_enhance_flair_is_served_by_the_t1w_zoo_and_says_so(make_nifti, make_zoo, tmp_path):
    from cahal_bids.core.hashing import file_sha256

    source = make_nifti(shape=(12, 10, 5), zooms=(1.0, 1.0, 4.0))
    zoo = make_zoo('zoo-t1w', cells=['V4A1'])
    out = tmp_path / 'sub-01_desc-cahal_FLAIR.nii.gz'
    argv = [str(source), str(out), '--modality', 'FLAIR', '--zoo', str(zoo), '-q']
    assert enhance.main(argv) == 0
    sidecar = json.loads(out.with_name('sub-01_desc-cahal_FLAIR.json').read_text())
    assert sidecar['route'] == 'FLAIR'
    assert sidecar['zoo'] == {
        'name': 'test-zoo',
        'version': '0.0.0',
        'modality': 'T1w',
        'path': str(zoo),
        'manifest_sha256': file_sha256(zoo / 'manifest.json'),
    }
    # the same image as T1w: the same expert, the same voxels; only the route differs
    as_t1w = tmp_path / 'as-t1w.nii.gz'
    assert enhance.main([str(source), str(as_t1w), '--zoo', str(zoo), '-q']) == 0
    assert json.loads(as_t1w.with_name('as-t1w.json').read_text())['route'] == 'T1w'
    import nibabel as nib

    np.testing.assert_array_equal(nib.load(out).get_fdata(), nib.load(as_t1w).get_fdata())


def test_enhance_t2w_defaults_to_the_shipped_t2w_zoo(make_nifti, tmp_path, one_thread):
    from cahal_bids.engine.zoo import Zoo, ZooError, default_zoo_path

    try:
        shipped = Zoo.open(default_zoo_path('T2w'))
    except ZooError as error:
        pytest.skip(str(error))
    source = make_nifti(shape=(12, 10, 5), zooms=(1.0, 1.0, 4.0))
    out = tmp_path / 'o.nii.gz'
    assert enhance.main([str(source), str(out), '--modality', 'T2w', '-q', '--threads', '1']) == 0
    sidecar = json.loads((tmp_path / 'o.json').read_text())
    assert sidecar['route'] == 'T2w'
    assert sidecar['zoo']['name'] == shipped.name and sidecar['zoo']['modality'] == 'T2w'
    assert sidecar['zoo']['manifest_sha256'] == shipped.manifest_sha256


def test_enhance_refuses_a_zoo_that_does_not_serve_the_route(make_nifti, make_zoo, capsys):
    source = make_nifti(shape=(12, 10, 5), zooms=(1.0, 1.0, 4.0))
    flair = make_zoo('zoo-flair', cells=['V4A1'], modality='FLAIR')
    t2w = make_zoo('zoo-t2w', cells=['V4A1'], modality='T2w')
    t1w = make_zoo('zoo-t1w', cells=['V4A1'])
    for zoo, modality, message in (
        (flair, 'T2w', 'trained for FLAIR, not T2w (a T2w image is restored by a zoo trained '
                       'for T2w)'),
        (t1w, 'T2w', 'trained for T1w, not T2w'),
        (t2w, 'FLAIR', 'trained for T2w, not FLAIR (a FLAIR image is restored by a zoo '
                       'trained for FLAIR or T1w)'),
        (t2w, 'T1w', 'trained for T2w, not T1w'),
    ):  # fmt: skip
        argv = [str(source), str(source.with_name('o.nii.gz')), '--zoo', str(zoo)]
        assert enhance.main([*argv, '--modality', modality]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not source.with_name('o.nii.gz').exists()


@pytest.mark.parametrize(
    ('value', 'message'),
    [
        ('PD', "'PD' has no route (no zoo restores PD images); the routed contrasts are "
               'T1w, FLAIR, T2w'),
        ('t2w', "'t2w': BIDS suffixes are case-sensitive, write T2w"),
    ],
)  # fmt: skip
def test_a_contrast_without_a_route_is_a_usage_error(capsys, value, message):
    for main, argv in (
        (enhance.main, ['x.nii.gz', 'y.nii.gz', '--modality', value]),
        (run.main, ['bids', 'out', 'participant', '--modalities', 'T1w', value]),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err
        assert err.strip().splitlines()[-1].endswith(message)
