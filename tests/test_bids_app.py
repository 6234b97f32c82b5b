"""The BIDS-App: command line, dataset crawl, derivative names, workflows, full small runs."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cahal_bids.app.bids import (
    BIDSInputError,
    InputImage,
    check_output_dir,
    collect_images,
    derivative_name,
    load_bids_filters,
    read_layout,
    strip_subject_prefix,
)
from cahal_bids.app.boilerplate import citation_markdown, methods_text
from cahal_bids.app.config import RunConfig
from cahal_bids.app.reports import write_subject_report
from cahal_bids.app.workflows.base import init_cahal_wf, init_single_subject_wf
from cahal_bids.cli import run
from cahal_bids.cli.parser import build_parser, memory_gb
from cahal_bids.core.grid import native_grid

from helpers import write_app_assets, write_bids_dataset, write_test_zoo

IMAGES = [
    ('sub-01/anat/sub-01_T1w.nii.gz', (1.0, 1.0, 4.0)),
    ('sub-01/anat/sub-01_FLAIR.nii.gz', (1.0, 1.0, 5.0)),
    ('sub-02/ses-a/anat/sub-02_ses-a_T1w.nii.gz', (1.2, 1.2, 3.0)),
    ('sub-02/ses-a/anat/sub-02_ses-a_acq-iso_T1w.nii.gz', (1.0, 1.0, 1.0)),
    ('sub-01/anat/sub-01_T2w.nii.gz', (1.0, 1.0, 3.0)),
]
"""sub-01 has the three routed contrasts, sub-02 T1w images only (one already at 1 mm)."""


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob('*'))
        if path.is_file()
    }


@pytest.fixture(scope='module')
def assets(tmp_path_factory) -> dict[str, Path]:
    return write_app_assets(tmp_path_factory.mktemp('bids_app'), IMAGES)


def _argv(assets, out: Path, work: Path, *extra: str) -> list[str]:
    return [
        str(assets['bids']),
        str(out),
        'participant',
        '-w',
        str(work),
        '--zoo',
        str(assets['t1w_zoo']),
        str(assets['flair_zoo']),
        '--template-file',
        str(assets['template']),
        '--template-name',
        'Phantom',
        '--sloppy',
        '--nprocs',
        '2',
        *extra,
    ]


@pytest.fixture(scope='module')
def full_run(assets):
    """One participant-level run of the whole tiny dataset (shared by several tests)."""
    before = _tree_digest(assets['bids'])
    out = assets['root'] / 'out'
    work = assets['root'] / 'work'
    status = run.main(_argv(assets, out, work, '--output-spaces'))
    return {'status': status, 'out': out, 'work': work, 'before': before}


# --- command line -------------------------------------------------------------------


def test_memory_sizes():
    assert memory_gb('8000') == 8.0
    assert memory_gb('8G') == 8.0
    assert memory_gb('2.5gb') == 2.5
    for bad in ('', 'lots', '-1', '0', '8Q'):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_gb(bad)


def test_parser_accepts_dashed_and_underscored_spellings():
    parser = build_parser()
    dashed = parser.parse_args(
        ['d', 'o', 'participant', '--participant-label', 'sub-01', '02', '--omp-nthreads', '3',
         '--mem', '6G', '--bids-filter-file', 'f.json', '--no-denoise', '--notrack', '-vv'],
    )  # fmt: skip
    underscored = parser.parse_args(
        ['d', 'o', 'participant', '--participant_label', 'sub-01', '02', '--omp_nthreads', '3',
         '--mem_mb', '6000', '--bids_filter_file', 'f.json', '--no_denoise', '--notrack', '-vv'],
    )  # fmt: skip
    for args in (dashed, underscored):
        assert args.participant_label == ['sub-01', '02']
        assert args.omp_nthreads == 3
        assert args.mem_gb == 6.0
        assert args.bids_filter_file == Path('f.json')
        assert args.no_denoise and args.verbose == 2
    defaults = parser.parse_args(['d', 'o', 'group'])
    assert defaults.modalities == ['T1w', 'FLAIR', 'T2w']
    assert defaults.template == 'MNI152NLin2009cAsym'
    assert defaults.device == 'auto'


def test_labels_and_names():
    assert strip_subject_prefix('sub-01') == strip_subject_prefix('01') == '01'
    entities = {'subject': '01', 'session': 'a', 'acquisition': 'ax', 'run': '2'}
    assert derivative_name(entities, 'FLAIR', desc='cahal') == (
        'sub-01_ses-a_acq-ax_run-2_desc-cahal_FLAIR.nii.gz'
    )
    assert derivative_name(entities, 'T1w', space='MNI152NLin2009cAsym', desc='cahal') == (
        'sub-01_ses-a_acq-ax_run-2_space-MNI152NLin2009cAsym_desc-cahal_T1w.nii.gz'
    )


def test_output_dir_must_be_outside_the_dataset(tmp_path):
    check_output_dir(tmp_path / 'bids', tmp_path / 'out')
    for inside in (tmp_path / 'bids', tmp_path / 'bids' / 'derivatives' / 'cahal'):
        with pytest.raises(BIDSInputError, match='outside the input dataset'):
            check_output_dir(tmp_path / 'bids', inside)


def test_filter_files_are_checked(tmp_path):
    good = tmp_path / 'good.json'
    good.write_text(json.dumps({'t1w': {'acquisition': 'iso'}}))
    assert load_bids_filters(good) == {'t1w': {'acquisition': 'iso'}}
    assert load_bids_filters(None) == {}
    cases = {
        'missing.json': None,
        'text.json': 'not json',
        'list.json': '[1]',
        'unknown.json': json.dumps({'bold': {}}),
        'scalar.json': json.dumps({'t1w': 3}),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(BIDSInputError, match=name):
            load_bids_filters(path)


def test_run_config_round_trips_through_toml(tmp_path):
    config = RunConfig(
        bids_dir='/data', output_dir='/out', analysis_level='participant', work_dir='/work',
        participant_label=['01'], bids_filters={'t1w': {'acquisition': None, 'run': 1}},
        zoos={'T1w': '/zoo "quoted"'}, mem_gb=6.5,
    )  # fmt: skip
    path = config.save(tmp_path / 'config.toml')
    assert tomllib.loads(path.read_text())['cahal_bids']['mem_gb'] == 6.5
    assert RunConfig.load(path) == config


# --- dataset crawl --------------------------------------------------------------------


def test_collect_images_selects_by_label_session_modality_and_filter(assets):
    layout = read_layout(assets['bids'])
    everything = collect_images(layout)
    assert sorted(everything) == ['01', '02']
    assert [image.modality for image in everything['01']] == ['T1w', 'FLAIR', 'T2w']
    assert len(everything['02']) == 2
    only = collect_images(layout, participant_labels=['sub-02'], session_labels=['ses-a'])
    assert list(only) == ['02']
    flair = collect_images(layout, modalities=['FLAIR'])
    assert list(flair) == ['01']
    filtered = collect_images(layout, filters={'t1w': {'acquisition': 'iso'}})
    assert [image.entities.get('acquisition') for image in filtered['02']] == ['iso']
    assert everything['02'][0].relative_path.startswith('sub-02/ses-a/anat/')
    with pytest.raises(BIDSInputError, match='sub-99'):
        collect_images(layout, participant_labels=['99'])
    with pytest.raises(BIDSInputError, match='no FLAIR image'):
        collect_images(layout, participant_labels=['02'], modalities=['FLAIR'])


def test_invalid_dataset_is_refused(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(BIDSInputError, match='not a valid BIDS dataset'):
        read_layout(tmp_path / 'empty')


# --- workflow graphs --------------------------------------------------------------------


def _image(contrast: str) -> InputImage:
    return InputImage(
        path=Path(f'/data/sub-01/anat/sub-01_{contrast}.nii.gz'), modality=contrast,
        subject='01', entities={'subject': '01'},
        relative_path=f'sub-01/anat/sub-01_{contrast}.nii.gz',
    )  # fmt: skip


def _images(with_flair: bool, with_t2w: bool = False) -> list[InputImage]:
    contrasts = ['T1w', *(['FLAIR'] if with_flair else []), *(['T2w'] if with_t2w else [])]
    return [_image(contrast) for contrast in contrasts]


@pytest.mark.parametrize('with_flair', [False, True])
@pytest.mark.parametrize('denoise', [False, True])
@pytest.mark.parametrize('skip_registration', [False, True])
@pytest.mark.parametrize('output_spaces', [False, True])
@pytest.mark.parametrize('write_intermediate', [False, True])
def test_single_subject_graph_follows_the_options(
    with_flair, denoise, skip_registration, output_spaces, write_intermediate
):
    workflow = init_single_subject_wf(
        subject='01', images=_images(with_flair), output_dir='/out',
        zoos={'T1w': '/zoo-t1w', 'FLAIR': '/zoo-flair'}, zoo_ids={'T1w': 'a', 'FLAIR': 'b'},
        denoise=denoise, device='cpu', precision='fp32', template='MNI152NLin2009cAsym',
        template_file='/tpl.nii.gz', skip_registration=skip_registration,
        output_spaces=output_spaces, write_intermediate=write_intermediate, sloppy=True,
        omp_nthreads=1, seed=0,
    )  # fmt: skip
    names = {f'sub_01_wf.{node.fullname}' for node in workflow._get_all_nodes()}
    modalities = ['t1w', 'flair'] if with_flair else ['t1w']
    for key in modalities:
        # the T1w registers to the template, the FLAIR through the T1w
        template_wf = 'register_t1w_wf.register' if key == 't1w' else 'compose_flair_wf.compose'
        resample_wf = f'{template_wf.split(".")[0]}.resample'
        assert f'sub_01_wf.enhance_{key}_wf.enhance' in names
        assert (f'sub_01_wf.enhance_{key}_wf.denoise' in names) == denoise
        assert (f'sub_01_wf.{template_wf}' in names) == (not skip_registration)
        assert (f'sub_01_wf.{resample_wf}' in names) == (output_spaces and not skip_registration)
        assert (f'sub_01_wf.ds_registration_{key}_wf.ds_brain_mask' in names) == (
            not skip_registration
        )
        assert (f'sub_01_wf.ds_enhanced_{key}_wf.ds_denoised' in names) == (
            write_intermediate and denoise
        )
    assert 'sub_01_wf.register_flair_wf.register' not in names
    assert ('sub_01_wf.flair2t1w_flair_wf.register' in names) == with_flair
    sinks = {name for name in names if name.split('.')[-1].startswith('ds_')}
    writers = {
        f'sub_01_wf.{node.fullname}'
        for node in workflow._get_all_nodes()
        if type(node.interface).__name__ == 'DerivativesDataSink'
    }
    assert sinks == writers  # only the sinks write derivatives
    workflow._create_flat_graph()  # every connection resolves
    # the methods text is what the sub-workflows say they do, with these options
    text = methods_text(workflow)
    assert 'restored to 1 mm isotropic' in text
    assert ('denoised with the adaptive non-local means' in text) == denoise
    assert ('to MNI152NLin2009cAsym space' in text) == (not skip_registration)
    assert ('additionally resampled' in text) == (output_spaces and not skip_registration)
    assert ('restored FLAIR image to T1w space' in text) == with_flair
    assert ('composition of its rigid transform to the T1w image' in text) == (
        with_flair and not skip_registration
    )


@pytest.mark.parametrize('with_t1w', [True, False])
def test_every_other_contrast_is_aligned_to_the_t1w(with_t1w):
    images = [_image(c) for c in (['T1w'] if with_t1w else []) + ['FLAIR', 'T2w']]
    workflow = init_single_subject_wf(
        subject='01', images=images, output_dir='/out',
        zoos={'T1w': '/zoo-t1w', 'FLAIR': '/zoo-flair', 'T2w': '/zoo-t1w'},
        zoo_ids={'T1w': 'a', 'FLAIR': 'b', 'T2w': 'a'}, denoise=False, device='cpu',
        precision='fp32', template='MNI152NLin2009cAsym', template_file='/tpl.nii.gz',
        skip_registration=False, output_spaces=False, write_intermediate=False, sloppy=True,
        omp_nthreads=1, seed=0,
    )  # fmt: skip
    names = {f'sub_01_wf.{node.fullname}' for node in workflow._get_all_nodes()}
    for key in ('flair', 't2w'):
        assert f'sub_01_wf.enhance_{key}_wf.enhance' in names
        # to the template: through the T1w when there is one, directly otherwise
        assert (f'sub_01_wf.register_{key}_wf.register' in names) == (not with_t1w)
        assert (f'sub_01_wf.compose_{key}_wf.compose' in names) == with_t1w
        assert (f'sub_01_wf.{key}2t1w_{key}_wf.register' in names) == with_t1w
        assert (f'sub_01_wf.ds_{key}2t1w_{key}_wf.ds_forward' in names) == with_t1w
    assert not any('t1w2t1w' in name for name in names)
    enhance = workflow.get_node('enhance_t2w_wf').get_node('enhance')
    assert enhance.inputs.contrast == 'T2w' and enhance.inputs.zoo == '/zoo-t1w'
    if with_t1w:
        sink = workflow.get_node('ds_t2w2t1w_t2w_wf').get_node('ds_forward')
        assert sink.inputs.extra_entities == [('from', 'T2w'), ('to', 'T1w'), ('mode', 'image')]
    workflow._create_flat_graph()
    text = methods_text(workflow)
    assert ('restored T2w image to T1w space' in text) == with_t1w
    assert ('restored FLAIR image to T1w space' in text) == with_t1w


def _run_config(**options) -> RunConfig:
    return RunConfig(
        bids_dir='/data', output_dir='/out', analysis_level='participant', work_dir='/work',
        zoos={'T1w': '/zoo-t1w', 'FLAIR': '/zoo-flair', 'T2w': '/zoo-t1w'}, **options,
    )  # fmt: skip


def test_methods_text_is_read_from_the_workflow_factories():
    def text(images, zoo_modalities=None, **options):
        workflow = init_cahal_wf(
            _run_config(**options), images, zoo_ids={'T1w': 'a', 'FLAIR': 'b', 'T2w': 'a'},
            template_file='/tpl.nii.gz', zoo_modalities=zoo_modalities,
        )  # fmt: skip
        return workflow, methods_text(workflow)

    both = {'01': _images(True), '02': [_images(False)[0]]}
    workflow, default = text(both)
    assert default.startswith('Results included in this manuscript')
    assert 'Each T1w and FLAIR image' in default
    assert default.rstrip().endswith('- Yarkoni et al., PyBIDS, JOSS 2019.')
    # two participants with different images: each paragraph still appears once
    paragraphs = default.split('\n\n')
    assert len(paragraphs) == len(set(paragraphs))
    assert default.count('restored to 1 mm isotropic') == 1
    # changing an option changes the text
    assert 'denoised' in default and 'denoised' not in text(both, denoise=False)[1]
    assert 'MNI152NLin2009cAsym space' not in text(both, skip_registration=True)[1]
    assert 'additionally resampled' in text(both, output_spaces=True)[1]
    assert 'to Phantom space' in text(both, template='Phantom')[1]
    assert 'Each T1w image' in text({'01': _images(False)}, modalities=['T1w'])[1]
    assert 'FLAIR image to T1w space' not in text({'01': _images(False)})[1]
    # T2w is named when present; a contrast restored by another's zoo says which
    served = {'T1w': 'T1w', 'FLAIR': 'T1w', 'T2w': 'T2w'}
    three = text({'01': _images(True, with_t2w=True)}, zoo_modalities=served)[1]
    assert 'Each T1w, FLAIR and T2w image' in three
    assert 'FLAIR images were restored by the zoo of experts trained for T1w images' in three
    assert 'T2w images were restored by' not in three
    assert 'restored T2w image to T1w space' in three
    assert 'T2w' not in default
    own = text({'01': _images(True, with_t2w=True)}, zoo_modalities={'T2w': 'T2w'})[1]
    assert 'Each T1w, FLAIR and T2w image' in own and 'experts trained for' not in own
    # and it is the factories' own __desc__, nothing rebuilt beside them
    enhance_wf = workflow.get_node('sub_01_wf').get_node('enhance_t1w_wf')
    enhance_wf.__desc__ = 'A sentence only this sub-workflow says.\n\n'
    assert 'A sentence only this sub-workflow says.' in methods_text(workflow)
    assert citation_markdown(workflow) == '### Methods\n\n' + methods_text(workflow)


def test_subject_report_renders_the_methods_as_html(tmp_path):
    methods = 'One *step* <b>.\n\nAnother step.\n\n### References\n\n- A paper.\n'
    page = write_subject_report(tmp_path, '01', boilerplate=methods).read_text()
    section = page.split('<h2>Methods</h2>', 1)[1]
    assert '<p>One <em>step</em> &lt;b&gt;.</p>' in section
    assert '<p>Another step.</p>' in section
    assert '<h3>References</h3>' in section and '<li>A paper.</li>' in section
    assert '###' not in page and '<b>' not in page


# --- full runs ----------------------------------------------------------------------------


def test_participant_run_writes_bids_derivatives(full_run, assets):
    assert full_run['status'] == 0
    out = full_run['out']
    description = json.loads((out / 'dataset_description.json').read_text())
    assert description['DatasetType'] == 'derivative'
    assert description['GeneratedBy'][0]['Name'] == 'cahal-bids'
    assert description['DatasetLinks']['raw'] == str(assets['bids'].resolve())
    assert (out / '.bidsignore').exists()
    citation = (out / 'logs' / 'CITATION.md').read_text()
    assert citation.startswith('### Methods\n\nResults included in this manuscript')
    assert 'CAHAL' in citation and 'to Phantom space' in citation
    assert 'additionally resampled' in citation and 'FLAIR image to T1w space' in citation
    assert 'Each T1w, FLAIR and T2w image' in citation
    assert 'images were restored by the zoo of experts trained for' not in citation
    assert 'T2w image to T1w space' in citation
    anat = out / 'sub-01' / 'anat'
    expected = [
        'sub-01_desc-cahal_T1w.nii.gz', 'sub-01_desc-cahal_T1w.json',
        'sub-01_desc-cahal_FLAIR.nii.gz', 'sub-01_desc-cahal_FLAIR.json',
        'sub-01_from-T1w_to-Phantom_mode-image_xfm.txt',
        'sub-01_from-Phantom_to-T1w_mode-image_xfm.txt',
        'sub-01_from-FLAIR_to-T1w_mode-image_xfm.txt',
        'sub-01_from-T1w_to-FLAIR_mode-image_xfm.txt',
        'sub-01_space-Phantom_desc-cahal_T1w.nii.gz',
        'sub-01_desc-cahal_T2w.nii.gz', 'sub-01_desc-cahal_T2w.json',
        'sub-01_from-T2w_to-Phantom_mode-image_xfm.txt',
        'sub-01_from-T2w_to-T1w_mode-image_xfm.txt',
        'sub-01_from-T2w_to-T1w_mode-image_xfm.json',
        'sub-01_from-T1w_to-T2w_mode-image_xfm.txt',
        'sub-01_space-Phantom_desc-cahal_T2w.nii.gz',
        'sub-01_space-T1w_desc-brain_mask.nii.gz', 'sub-01_space-T1w_desc-brain_mask.json',
        'sub-01_space-FLAIR_desc-brain_mask.nii.gz', 'sub-01_space-T2w_desc-brain_mask.nii.gz',
    ]  # fmt: skip
    for name in expected:
        assert (anat / name).is_file(), name
    session = out / 'sub-02' / 'ses-a' / 'anat'
    assert (session / 'sub-02_ses-a_desc-cahal_T1w.nii.gz').is_file()
    assert (session / 'sub-02_ses-a_acq-iso_desc-cahal_T1w.nii.gz').is_file()
    assert not list(out.rglob('*desc-denoised*'))  # only with --write-intermediate
    assert not list(out.rglob('.*.tmp*'))  # no temporary file left behind
    text = (anat / 'sub-01_from-T1w_to-Phantom_mode-image_xfm.txt').read_text()
    assert text.startswith('#Insight Transform File V1.0')


def test_sidecars_carry_provenance_and_routing(full_run):
    anat = full_run['out'] / 'sub-01' / 'anat'
    sidecar = json.loads((anat / 'sub-01_desc-cahal_FLAIR.json').read_text())
    assert sidecar['Sources'] == ['bids:raw:sub-01/anat/sub-01_FLAIR.nii.gz']
    assert sidecar['SpatialReference'] == 'bids:raw:sub-01/anat/sub-01_FLAIR.nii.gz'
    assert sidecar['Denoised'] is True
    assert '1 mm isotropic' in sidecar['Resolution']
    details = sidecar['CAHAL']
    assert details['voxel_sizes'] == [1.0, 1.0, 5.0]
    assert details['cell'] == 'V5A1' and details['skipped'] is False
    assert details['route'] == 'FLAIR' and details['zoo']['modality'] == 'FLAIR'
    assert len(details['zoo']['manifest_sha256']) == 64
    assert len(details['expert']['sha256']) == 64
    assert 'torch' in details['software']
    consistency = details['consistency']
    assert consistency['rmse_trilinear'] > 0 and consistency['rmse_cahal'] > 0
    assert isinstance(consistency['warning'], bool) and consistency['projection'] == 'adaptive'
    skipped = json.loads(
        (
            full_run['out'] / 'sub-02/ses-a/anat/sub-02_ses-a_acq-iso_desc-cahal_T1w.json'
        ).read_text()
    )
    assert skipped['CAHAL']['skipped'] is True
    assert 'consistency' not in skipped['CAHAL']
    registration = json.loads(
        (anat / 'sub-01_from-T1w_to-Phantom_mode-image_xfm.json').read_text()
    )['Registration']
    assert registration['stages'] == [
        'Initialization',
        'QuickRigid',
        'AffineFast',
        'Affine in the mask',
        'Skull-stripping',
        'Affine, brain to brain',
    ]
    assert registration['brain_extracted'] is False
    assert registration['brain_stage']['brain_litres'] > 0
    assert registration['brain_stage']['moved_mm'] >= 0
    assert registration['quality']['doubtful'] is False
    assert registration['quality']['nmi_brain'] > registration['quality']['threshold']
    composed = json.loads((anat / 'sub-01_from-FLAIR_to-Phantom_mode-image_xfm.json').read_text())[
        'Registration'
    ]
    assert composed['composed_through'] == 'T1w' and 'quality' in composed
    mask = nib.load(anat / 'sub-01_space-FLAIR_desc-brain_mask.nii.gz')
    enhanced = nib.load(anat / 'sub-01_desc-cahal_FLAIR.nii.gz')
    assert mask.shape == enhanced.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, enhanced.affine, atol=1e-4)
    assert 0 < np.asarray(mask.dataobj).sum() < np.prod(mask.shape)


def test_t2w_is_served_by_the_shipped_t2w_zoo_and_aligned_to_the_t1w(full_run, assets):
    from cahal_bids.core.hashing import file_sha256
    from cahal_bids.engine.zoo import default_zoo_path

    anat = full_run['out'] / 'sub-01' / 'anat'
    sidecar = json.loads((anat / 'sub-01_desc-cahal_T2w.json').read_text())
    assert sidecar['Sources'] == ['bids:raw:sub-01/anat/sub-01_T2w.nii.gz']
    details = sidecar['CAHAL']
    assert details['route'] == 'T2w' and details['cell'] == 'V3A2'
    # no T2w zoo among --zoo: the one the route table names, not the given T1w zoo
    zoo = default_zoo_path('T2w')
    assert details['zoo']['modality'] == 'T2w' and details['zoo']['path'] == str(zoo)
    assert details['zoo']['manifest_sha256'] == file_sha256(zoo / 'manifest.json')
    t1w = json.loads((anat / 'sub-01_desc-cahal_T1w.json').read_text())['CAHAL']
    assert t1w['route'] == 'T1w' and t1w['zoo']['path'] == str(assets['t1w_zoo'].resolve())
    rigid = json.loads((anat / 'sub-01_from-T2w_to-T1w_mode-image_xfm.json').read_text())
    assert rigid['Registration']['stages'] == ['QuickRigid']
    t1w_uri = 'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
    assert rigid['Sources'] == ['bids:raw:sub-01/anat/sub-01_T2w.nii.gz', t1w_uri]
    assert rigid['SpatialReference'] == t1w_uri  # the T1w it goes to, whichever session
    figures = full_run['out'] / 'sub-01' / 'figures'
    assert (figures / 'sub-01_space-T1w_desc-registration_T2w.png').is_file()


def test_outputs_line_up_with_inputs_in_world_space(full_run, assets):
    for relative, _ in IMAGES:
        source = nib.load(assets['bids'] / relative)
        name = (
            Path(relative)
            .name.replace('_T1w', '_desc-cahal_T1w')
            .replace('_FLAIR', '_desc-cahal_FLAIR')
            .replace('_T2w', '_desc-cahal_T2w')
        )
        output = nib.load(full_run['out'] / Path(relative).parent / name)
        expected = native_grid(source.shape, source.affine)
        assert output.shape == expected.shape
        np.testing.assert_allclose(output.affine, expected.affine, atol=1e-4)
        assert output.get_data_dtype() == np.float32
        centre_in = source.affine @ np.array([*(np.array(source.shape) - 1) / 2, 1.0])
        centre_out = output.affine @ np.array([*(np.array(output.shape) - 1) / 2, 1.0])
        np.testing.assert_allclose(centre_in, centre_out, atol=1e-3)


def test_the_input_dataset_is_never_written(full_run, assets):
    assert _tree_digest(assets['bids']) == full_run['before']


def test_reports_link_real_figures(full_run):
    out = full_run['out']
    for subject in ('01', '02'):
        page = (out / f'sub-{subject}.html').read_text()
        sources = [part.split('"')[0] for part in page.split('src="')[1:]]
        assert sources, f'no figure in sub-{subject}.html'
        for source in sources:
            assert not source.startswith('/')  # relative, so the folder can move
            assert (out / source).is_file()
        assert 'No errors to report' in page
        # the methods text of logs/CITATION.md, rendered as HTML
        methods = page.split('<h2>Methods</h2>', 1)[1]
        assert '<p>Results included in this manuscript' in methods
        assert '<h3>References</h3>' in methods and '<li>' in methods
        assert '###' not in page
    page = (out / 'sub-01.html').read_text()
    assert 'space-Phantom_desc-registration_T1w.png' in page
    # the T2w is listed like the FLAIR: its image, its zoo, its transforms and figures
    for contrast in ('FLAIR', 'T2w'):
        assert f'<h3>sub-01_desc-cahal_{contrast}</h3>' in page
        assert f'sub-01_from-{contrast}_to-T1w_mode-image_xfm.txt' in page
        assert f'sub-01_space-T1w_desc-registration_{contrast}.png' in page
    assert '<th>route</th><td>T2w</td>' in page
    assert '<th>route</th><td>FLAIR</td>' in page
    assert 'consistency RMSE, CAHAL / trilinear' in page


def test_group_level_summarises_every_image(full_run, assets):
    out = full_run['out']
    assert run.main([str(assets['bids']), str(out), 'group']) == 0
    lines = (out / 'group_summary.tsv').read_text().splitlines()
    header = lines[0].split('\t')
    rows = [dict(zip(header, line.split('\t'), strict=True)) for line in lines[1:]]
    assert len(rows) == len(IMAGES)
    by_file = {row['file']: row for row in rows}
    flair = by_file['sub-01/anat/sub-01_desc-cahal_FLAIR.nii.gz']
    assert flair['cell'] == 'V5A1' and flair['modality'] == 'FLAIR'
    assert flair['registration_path'] == 'through T1w'
    assert flair['registration_doubtful'] == 'False'
    assert float(flair['registration_nmi_brain']) > float(flair['registration_threshold'])
    t2w = by_file['sub-01/anat/sub-01_desc-cahal_T2w.nii.gz']
    assert t2w['cell'] == 'V3A2' and t2w['modality'] == 'T2w' and t2w['skipped'] == 'False'
    assert t2w['registration_path'] == 'through T1w'  # to the template, through the T1w
    t1w = by_file['sub-01/anat/sub-01_desc-cahal_T1w.nii.gz']
    assert t1w['registration_path'] == 'direct' and t1w['registration_doubtful'] == 'False'
    assert 'correlation' not in lines[0]
    assert float(flair['consistency_rmse_trilinear']) > 0
    assert float(flair['consistency_rmse_cahal']) > 0
    assert flair['consistency_warning'] in {'True', 'False'}
    iso = by_file['sub-02/ses-a/anat/sub-02_ses-a_acq-iso_desc-cahal_T1w.nii.gz']
    assert iso['skipped'] == 'True' and iso['cell'] == 'n/a'
    assert iso['consistency_rmse_cahal'] == iso['consistency_warning'] == 'n/a'
    assert 'sub-01.html' in (out / 'group.html').read_text()


def test_rerun_with_the_same_work_dir_recomputes_nothing(full_run, assets):
    work = full_run['work']
    results = [*work.rglob('result_enhance.pklz'), *work.rglob('result_register.pklz')]
    assert len(results) >= 6
    stamps = {path: path.stat().st_mtime_ns for path in results}
    deleted = full_run['out'] / 'sub-01' / 'anat' / 'sub-01_desc-cahal_T1w.nii.gz'
    deleted.unlink()
    assert run.main(_argv(assets, full_run['out'], work, '--output-spaces')) == 0
    assert {path: path.stat().st_mtime_ns for path in results} == stamps
    assert deleted.is_file()  # the sinks always run, so a lost output comes back


def test_failing_images_do_not_stop_the_others(assets, tmp_path, capsys):
    import gzip

    bids = write_bids_dataset(
        tmp_path / 'bids',
        [('sub-01/anat/sub-01_T1w.nii.gz', (1.0, 1.0, 4.0)),
         ('sub-02/anat/sub-02_T1w.nii.gz', (1.0, 1.0, 4.0)),
         ('sub-03/anat/sub-03_T1w.nii.gz', (1.0, 1.0, 4.0))],
    )  # fmt: skip
    truncated = bids / 'sub-02' / 'anat' / 'sub-02_T1w.nii.gz'
    raw = gzip.decompress(truncated.read_bytes())
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # header fine, voxels cut
    garbage = bids / 'sub-03' / 'anat' / 'sub-03_T1w.nii.gz'
    garbage.write_bytes(b'this is not a NIfTI file')
    out = tmp_path / 'out'
    argv = _argv(assets, out, tmp_path / 'work', '--skip-registration', '--no-denoise')
    argv[0] = str(bids)
    assert run.main(argv) == 1
    err = capsys.readouterr().err
    assert 'failures' in err
    reasons = [line for line in err.splitlines() if line.startswith('  sub-')]
    assert any('sub-02_T1w.nii.gz' in line for line in reasons), err
    assert any('sub-03_T1w.nii.gz' in line for line in reasons), err
    assert (out / 'sub-01' / 'anat' / 'sub-01_desc-cahal_T1w.nii.gz').is_file()
    assert not list((out / 'sub-02').rglob('*.nii.gz'))
    assert not (out / 'sub-03').exists()
    crashes = list((out / 'sub-02' / 'log').rglob('crash-*'))
    assert crashes and 'sub-02_T1w.nii.gz' in crashes[0].read_text()
    page = (out / 'sub-02.html').read_text()
    assert 'Errors' in page and crashes[0].name in page


def test_an_image_whose_contrast_has_no_route_is_skipped_with_a_reason(assets, tmp_path, capsys):
    bids = write_bids_dataset(
        tmp_path / 'bids',
        [('sub-01/anat/sub-01_T1w.nii.gz', (1.0, 1.0, 4.0)),
         ('sub-01/anat/sub-01_PDw.nii.gz', (1.0, 1.0, 4.0))],
    )  # fmt: skip
    filters = tmp_path / 'filters.json'
    filters.write_text(json.dumps({'t2w': {'suffix': 'PDw'}}))  # selects the PDw as a T2w
    out = tmp_path / 'out'
    argv = _argv(assets, out, tmp_path / 'work', '--skip-registration', '--no-denoise',
                 '--bids-filter-file', str(filters))  # fmt: skip
    argv[0] = str(bids)
    assert run.main(argv) == 1  # not everything asked for was done
    err = capsys.readouterr().err
    reason = 'sub-01_PDw.nii.gz: its contrast PDw has no route'
    assert f'sub-01: skipped: {bids}/sub-01/anat/{reason}' in err
    assert [line for line in err.splitlines() if reason in line][0].endswith(
        'cahal-bids restores T1w, FLAIR, T2w images)'
    )
    # the rest still ran
    assert (out / 'sub-01' / 'anat' / 'sub-01_desc-cahal_T1w.nii.gz').is_file()
    assert not list(out.rglob('*PDw*')) and not list(out.rglob('*T2w*'))


def test_zoos_follow_the_route_table(assets, tmp_path):
    from cahal_bids.engine.zoo import ZooError, default_zoo_path

    t1w, flair = str(assets['t1w_zoo'].resolve()), str(assets['flair_zoo'].resolve())
    zoos, ids, served = run._open_zoos([Path(t1w)], ['T1w', 'FLAIR'])
    assert zoos == {'T1w': t1w, 'FLAIR': t1w}  # the given T1w zoo serves FLAIR
    assert served == {'T1w': 'T1w', 'FLAIR': 'T1w'}
    assert ids['FLAIR'] == ids['T1w'] and ids['T1w'].startswith('test-zoo 0.0.0 ')
    zoos, _, served = run._open_zoos([Path(t1w), Path(flair)], ['T1w', 'FLAIR'])
    assert zoos == {'T1w': t1w, 'FLAIR': flair} and served['FLAIR'] == 'FLAIR'
    # a zoo trained for T2w serves T2w images, never T1w ones
    t2w = write_test_zoo(tmp_path / 'zoo-t2w', cells=['V4A1'], modality='T2w')
    zoos, _, served = run._open_zoos([Path(t1w), t2w], ['T1w', 'T2w'])
    assert zoos == {'T1w': t1w, 'T2w': str(t2w.resolve())}
    assert served == {'T1w': 'T1w', 'T2w': 'T2w'}
    with pytest.raises(ZooError, match='a second --zoo for T1w'):
        run._open_zoos([Path(t1w), Path(t1w)], ['T1w'])
    # no zoo given for a contrast: the shipped zoo the route table names (for T2w its own,
    # never a given T1w zoo)
    try:
        shipped = str(default_zoo_path('T2w'))
    except ZooError as error:
        pytest.skip(str(error))
    zoos, _, served = run._open_zoos([Path(t1w), Path(flair)], ['T1w', 'FLAIR', 'T2w'])
    assert zoos == {'T1w': t1w, 'FLAIR': flair, 'T2w': shipped} and served['T2w'] == 'T2w'


@pytest.mark.parametrize(
    ('extra', 'message'),
    [
        (['--participant-label', '07'], 'sub-07 not found'),
        (['--template-file', '/nonexistent/tpl.nii.gz'], 'template file not found'),
        (['--bids-filter-file', '/nonexistent/filters.json'], 'filter file not found'),
    ],
)
def test_input_errors_exit_2_and_write_nothing(assets, tmp_path, capsys, extra, message):
    out = tmp_path / 'out'
    assert run.main(_argv(assets, out, tmp_path / 'work', *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_output_inside_the_dataset_is_refused(assets, capsys):
    before = _tree_digest(assets['bids'])
    inside = assets['bids'] / 'derivatives' / 'cahal'
    assert run.main(_argv(assets, inside, assets['root'] / 'w2')) == 2
    assert 'outside the input dataset' in capsys.readouterr().err
    assert _tree_digest(assets['bids']) == before


def test_missing_template_names_the_template_folder_and_alternative(
    assets, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv('TEMPLATEFLOW_HOME', str(tmp_path / 'tf'))
    argv = [str(assets['bids']), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'w'),
            '--zoo', str(assets['t1w_zoo']), str(assets['flair_zoo'])]  # fmt: skip
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert 'MNI152NLin2009cAsym' in err
    assert str(tmp_path / 'tf') in err
    assert '--template-file' in err


def test_boilerplate_only(assets, tmp_path, capsys):
    def boilerplate(out, *options):
        assert run.main([str(assets['bids']), str(out), 'participant', '--boilerplate-only',
                         '-w', str(tmp_path / 'w'), *options]) == 0  # fmt: skip
        assert f'methods boilerplate written to {out / "logs" / "CITATION.md"}' in (
            capsys.readouterr().out
        )
        assert sorted(p.name for p in out.rglob('*') if p.is_file()) == ['CITATION.md']
        return (out / 'logs' / 'CITATION.md').read_text()

    text = boilerplate(tmp_path / 'out', '--no-denoise')
    assert text.startswith('### Methods\n\n')
    assert 'CAHAL' in text and 'denoised' not in text
    # the template is named, not needed: no TemplateFlow download for the text
    assert 'to MNI152NLin2009cAsym space' in text
    assert 'FLAIR image to T1w space' in text  # sub-01 has a T1w, a FLAIR and a T2w
    assert 'T2w image to T1w space' in text and 'Each T1w, FLAIR and T2w image' in text
    assert not (tmp_path / 'w').exists()
    # the text follows the options of the run
    other = boilerplate(tmp_path / 'other', '--skip-registration', '--modalities', 'T1w')
    assert 'denoised' in other and 'Each T1w image' in other
    assert 'MNI152NLin2009cAsym' not in other and 'FLAIR' not in other.split('###')[1]


def test_run_configuration_is_saved_with_the_logs(full_run):
    configs = sorted((full_run['out'] / 'sub-01' / 'log').rglob('cahal-bids.toml'))
    assert configs
    config = RunConfig.load(configs[0])
    assert config.template == 'Phantom'
    assert config.sloppy is True and config.output_spaces is True
    assert sorted(config.zoos) == ['FLAIR', 'T1w', 'T2w']
    # no --zoo for T2w: the shipped T2w zoo, never the given T1w one
    assert config.zoos['T2w'] not in (config.zoos['T1w'], config.zoos['FLAIR'])
    assert Path(config.zoos['T2w']).name == 't2w'
    assert config.modalities == ['T1w', 'FLAIR', 'T2w']
    assert os.path.isabs(config.work_dir)


def test_plugin_file_and_graph(assets, tmp_path):
    plugin = tmp_path / 'plugin.yml'
    plugin.write_text('plugin: Linear\nplugin_args: {}\n')
    out, work = tmp_path / 'out', tmp_path / 'work'
    argv = _argv(assets, out, work, '--use-plugin', str(plugin), '--write-graph',
                 '--skip-registration', '--no-denoise', '--participant-label', '02')  # fmt: skip
    assert run.main(argv) == 0
    assert list(work.rglob('graph*.dot'))
    assert (out / 'sub-02' / 'ses-a' / 'anat' / 'sub-02_ses-a_desc-cahal_T1w.nii.gz').is_file()
    assert not (out / 'sub-01').exists()
    config = RunConfig.load(next((out / 'sub-02' / 'log').rglob('cahal-bids.toml')))
    assert config.plugin_file == str(plugin.resolve())


def test_bad_plugin_file_exits_2(assets, tmp_path, capsys):
    plugin = tmp_path / 'plugin.yml'
    plugin.write_text('- just a list\n')
    argv = _argv(assets, tmp_path / 'out', tmp_path / 'work', '--use-plugin', str(plugin))
    assert run.main(argv) == 2
    assert 'plugin' in capsys.readouterr().err


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_clinical_flair_session(shared_data, assets, tmp_path, monkeypatch):
    """One real thick-slice FLAIR session through the whole app, registered to the real
    MNI152NLin2009cAsym read from an offline TemplateFlow home."""
    import shutil

    home = tmp_path / 'templateflow'
    shutil.copytree(shared_data / 'templateflow', home)
    monkeypatch.setenv('TEMPLATEFLOW_HOME', str(home))
    out = tmp_path / 'out'
    argv = [str(shared_data / 'lr-clinical'), str(out), 'participant', '-w', str(tmp_path / 'w'),
            '--participant-label', 'p09', '--zoo', str(assets['flair_zoo']), '--sloppy',
            '--no-denoise', '--nprocs', '2']  # fmt: skip
    assert run.main(argv) == 0
    anat = out / 'sub-p09' / 'ses-2' / 'anat'
    source = nib.load(shared_data / 'lr-clinical/sub-p09/ses-2/anat/sub-p09_ses-2_FLAIR.nii.gz')
    output = nib.load(anat / 'sub-p09_ses-2_desc-cahal_FLAIR.nii.gz')
    grid = native_grid(source.shape, source.affine)
    assert output.shape == grid.shape
    np.testing.assert_allclose(output.affine, grid.affine, atol=1e-3)
    registration = json.loads(
        (anat / 'sub-p09_ses-2_from-FLAIR_to-MNI152NLin2009cAsym_mode-image_xfm.json').read_text()
    )['Registration']
    assert registration['quality']['doubtful'] is False, registration['quality']
    assert (anat / 'sub-p09_ses-2_space-FLAIR_desc-brain_mask.nii.gz').is_file()
    assert (out / 'sub-p09.html').is_file()


@pytest.mark.parametrize('label', ['../../etc', 'sub-../x', '01/../../02'])
def test_labels_cannot_escape_the_output_folder(assets, tmp_path, capsys, label):
    out = tmp_path / 'out'
    argv = _argv(assets, out, tmp_path / 'work', '--participant-label', label)
    assert run.main(argv) == 2
    assert 'not found' in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.parent.glob('etc*'))


def test_doubtful_registrations_are_flagged_in_reports_and_group_table(tmp_path):
    from cahal_bids.app.group import collect_group_rows, write_group_summary
    from cahal_bids.app.reports import write_group_report

    anat = tmp_path / 'sub-01' / 'anat'
    anat.mkdir(parents=True)
    cahal = {'voxel_sizes': [1.0, 1.0, 5.0], 'V': 5.0, 'A': 0.2, 'cell': 'V5A1'}
    for contrast, quality, extra in (
        ('FLAIR', {'nmi_brain': 1.0213, 'threshold': 1.043, 'brain_coverage': 0.97,
                   'doubtful': True}, {'brain_extracted': True}),
        ('T2w', {'nmi_brain': 1.0612, 'threshold': 1.043, 'brain_coverage': 1.0,
                 'doubtful': False}, {'composed_through': 'T1w'}),
    ):  # fmt: skip
        (anat / f'sub-01_desc-cahal_{contrast}.json').write_text(json.dumps({'CAHAL': cahal}))
        (anat / f'sub-01_from-{contrast}_to-MNI152NLin2009cAsym_mode-image_xfm.json').write_text(
            json.dumps({'Registration': {'stages': ['Rigid'], 'quality': quality, **extra}})
        )
    page = write_subject_report(tmp_path, '01').read_text()
    assert page.count('DOUBTFUL: check the figure') == 1
    assert 'Doubtful registration' in page
    assert 'similarity in the template brain (NMI)' in page and '1.0213 (threshold 1.0430' in page
    assert 'direct, brain-extracted' in page and 'through T1w' in page
    assert 'correlation with reference' not in page
    rows = {row['modality']: row for row in collect_group_rows(tmp_path)}
    assert rows['FLAIR']['registration_doubtful'] is True
    assert rows['FLAIR']['registration_nmi_brain'] == '1.0213'
    assert rows['T2w']['registration_doubtful'] is False
    assert rows['T2w']['registration_path'] == 'through T1w'
    table = write_group_summary(tmp_path, list(rows.values())).read_text()
    assert 'registration_doubtful' in table.splitlines()[0]
    group = write_group_report(tmp_path, list(rows.values())).read_text()
    assert group.count('<tr class="doubtful">') == 1
    assert '1 doubtful registration(s)' in group
