"""Merging zoos trained a few cells at a time (``cahal-train merge``)."""

from __future__ import annotations

import json

import pytest

from cahal_bids.cli.train import main as train_main
from cahal_bids.engine.zoo import MANIFEST_NAME, Zoo, ZooError, file_sha256
from cahal_bids.training.zoo_merge import merge_zoos


def _sha(zoo_path, cell):
    return json.loads((zoo_path / MANIFEST_NAME).read_text())['experts'][cell]['sha256']


def test_last_zoo_wins_and_files_carry_over(make_zoo, tmp_path):
    base = make_zoo('base', seed=0)
    refined = make_zoo('refined', cells=['V4A1', 'V5A1'], seed=100)
    merged = merge_zoos([Zoo.open(base), Zoo.open(refined)], tmp_path / 'merged', version='9')
    zoo = Zoo.open(merged)
    assert len(zoo.trained_cells) == 18
    assert zoo.version == '9' and zoo.name == 'test-zoo'
    for cell in ('V4A1', 'V5A1'):
        assert zoo.experts[cell]['sha256'] == _sha(refined, cell)
        assert file_sha256(merged / f'{cell}.safetensors') == _sha(refined, cell)
    assert zoo.experts['V1A3']['sha256'] == _sha(base, 'V1A3')
    assert zoo.experts['V1A3']['sha256'] != _sha(refined, 'V4A1')
    assert zoo.experts['V4A1']['provenance']['zoo'] == 'test-zoo 0.0.0'
    sources = {tuple(entry['cells']) for entry in zoo.manifest['training']['merged_from']}
    assert ('V4A1', 'V5A1') in sources and len(sources) == 2


def test_disjoint_halves_make_a_whole(make_zoo, tmp_path):
    from cahal_bids.core.routing import CELLS

    first = make_zoo('a', cells=CELLS[::2])
    second = make_zoo('b', cells=CELLS[1::2], seed=50)
    merged = Zoo.open(merge_zoos([Zoo.open(first), Zoo.open(second)], tmp_path / 'm'))
    assert merged.trained_cells == frozenset(CELLS)
    assert not any(merged.choose(cell).substituted for cell in CELLS)


@pytest.mark.parametrize(
    ('options', 'field'),
    [
        ({'axis_order': 'thickest-last'}, 'axis_order'),
        ({'initial_filters': 6}, 'architecture'),
        ({'modality': 'FLAIR'}, 'modality'),
        (
            {
                'norm_statistics': {
                    'method': 'patch-mean',
                    'patch_size': 16,
                    'patches': 2,
                    'seed': 0,
                }
            },
            'norm_statistics',
        ),
    ],
)
def test_zoos_run_differently_are_refused(make_zoo, tmp_path, options, field):
    plain = make_zoo('plain', cells=['V1A3'])
    other = make_zoo('other', cells=['V2A3'], **options)
    with pytest.raises(ZooError, match=field):
        merge_zoos([Zoo.open(plain), Zoo.open(other)], tmp_path / 'merged')
    assert not (tmp_path / 'merged' / MANIFEST_NAME).exists()


def test_output_cannot_be_an_input(make_zoo):
    base = make_zoo('base', cells=['V1A3'])
    other = make_zoo('other', cells=['V2A3'])
    with pytest.raises(ZooError, match='overwrite'):
        merge_zoos([Zoo.open(base), Zoo.open(other)], base)
    assert Zoo.open(base).trained_cells == frozenset({'V1A3'})


def test_one_zoo_is_not_a_merge(make_zoo, tmp_path):
    with pytest.raises(ZooError, match='at least two'):
        merge_zoos([Zoo.open(make_zoo('only'))], tmp_path / 'merged')


def test_cli_merge(make_zoo, tmp_path, capsys):
    base = make_zoo('base', cells=['V1A3', 'V4A1'])
    refined = make_zoo('refined', cells=['V4A1'], seed=7)
    out = tmp_path / 'merged'
    assert train_main(['merge', str(base), str(refined), '--out', str(out)]) == 0
    assert '2 experts' in capsys.readouterr().out
    assert Zoo.open(out).experts['V4A1']['sha256'] == _sha(refined, 'V4A1')


def test_cli_merge_errors_name_the_problem(make_zoo, tmp_path, capsys):
    base = make_zoo('base', cells=['V1A3'])
    missing = tmp_path / 'nowhere'
    assert train_main(['merge', str(base), str(missing), '--out', str(tmp_path / 'm')]) == 2
    assert str(missing) in capsys.readouterr().err
    other = make_zoo('other', cells=['V2A3'], axis_order='thickest-last')
    assert train_main(['merge', str(base), str(other), '--out', str(tmp_path / 'm')]) == 2
    error = capsys.readouterr().err
    assert 'axis_order' in error and error.count('\n') == 1


def test_merging_merged_zoos_keeps_one_entry_per_run(make_zoo, tmp_path):
    first = make_zoo('first', cells=['V1A3', 'V2A3'])
    second = make_zoo('second', cells=['V2A2'], seed=9)
    merged = merge_zoos([Zoo.open(first), Zoo.open(second)], tmp_path / 'merged')
    refined = make_zoo('refined', cells=['V2A3'], seed=21)
    again = Zoo.open(merge_zoos([Zoo.open(merged), Zoo.open(refined)], tmp_path / 'again'))
    runs = [entry['cells'] for entry in again.manifest['training']['merged_from']]
    assert runs == [['V1A3'], ['V2A2'], ['V2A3']]
