"""Expert zoos: writing, checksums, refusal of tampered or escaping files, curriculum fallback."""

from __future__ import annotations

import json

import pytest
import torch

from cahal_bids.core.routing import CELLS
from cahal_bids.engine.zoo import (
    MANIFEST_NAME,
    ROUTED_MODALITIES,
    SHIPPED_ZOOS,
    Zoo,
    ZooError,
    default_zoo_path,
    file_sha256,
    nearest_trained_cell,
    route_table_text,
    serving_modalities,
    write_zoo,
)


def _state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        'conv.weight': torch.randn(4, 1, 3, 3, 3, generator=generator),
        'conv.bias': torch.randn(4, generator=generator),
    }


@pytest.fixture
def tiny_zoo(tmp_path):
    return write_zoo(
        tmp_path / 'zoo',
        name='test-zoo',
        version='0.0.1',
        modality='T1w',
        architecture={'name': 'Test', 'config': {}},
        normalization={'method': 'robust-scale', 'percentile': 99.5},
        experts={'V1A3': _state(0), 'V5A1': _state(1), 'V3A2': _state(2)},
        provenance={'V5A1': {'steps': 10}},
    )


def test_round_trip(tiny_zoo):
    zoo = Zoo.open(tiny_zoo)
    assert zoo.name == 'test-zoo'
    assert zoo.trained_cells == {'V1A3', 'V5A1', 'V3A2'}
    loaded = zoo.load_state_dict('V5A1')
    for key, value in _state(1).items():
        assert torch.equal(loaded[key], value)
    manifest = json.loads((tiny_zoo / MANIFEST_NAME).read_text())
    entry = manifest['experts']['V5A1']
    assert entry['sha256'] == file_sha256(tiny_zoo / 'V5A1.safetensors')
    assert entry['parameters'] == 4 * 27 + 4
    assert entry['provenance'] == {'steps': 10}
    assert manifest['grid']['cells'] == list(CELLS)


def test_half_precision_storage(tmp_path):
    path = write_zoo(
        tmp_path / 'zoo',
        name='z',
        version='1',
        modality='FLAIR',
        architecture={},
        normalization={},
        experts={'V5A1': _state(1)},
        storage_dtype='float16',
    )
    loaded = Zoo.open(path).load_state_dict('V5A1')
    assert loaded['conv.weight'].dtype == torch.float32
    torch.testing.assert_close(
        loaded['conv.weight'], _state(1)['conv.weight'], atol=3e-3, rtol=1e-3
    )


def test_corrupted_expert_is_refused(tiny_zoo):
    target = tiny_zoo / 'V5A1.safetensors'
    payload = bytearray(target.read_bytes())
    payload[-1] ^= 0xFF
    target.write_bytes(bytes(payload))
    with pytest.raises(ZooError, match='V5A1.safetensors: sha256 does not match'):
        Zoo.open(tiny_zoo)


def test_expert_swapped_after_open_is_refused(tiny_zoo):
    zoo = Zoo.open(tiny_zoo)
    (tiny_zoo / 'V5A1.safetensors').write_bytes((tiny_zoo / 'V1A3.safetensors').read_bytes())
    with pytest.raises(ZooError, match='sha256 does not match'):
        zoo.load_state_dict('V5A1')


def test_renamed_expert_is_refused(tiny_zoo):
    (tiny_zoo / 'V5A1.safetensors').rename(tiny_zoo / 'renamed.safetensors')
    with pytest.raises(ZooError, match='expert file for V5A1 is missing'):
        Zoo.open(tiny_zoo)


@pytest.mark.parametrize('name', ['../outside.safetensors', '/etc/passwd', 'sub/dir.safetensors'])
def test_manifest_pointing_outside_is_refused(tiny_zoo, name):
    manifest_path = tiny_zoo / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest['experts']['V5A1']['file'] = name
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ZooError, match='outside the zoo folder'):
        Zoo.open(tiny_zoo)


def test_symlink_escaping_the_zoo_is_refused(tiny_zoo, tmp_path):
    outside = tmp_path / 'outside.safetensors'
    outside.write_bytes((tiny_zoo / 'V5A1.safetensors').read_bytes())
    (tiny_zoo / 'V5A1.safetensors').unlink()
    (tiny_zoo / 'V5A1.safetensors').symlink_to(outside)
    with pytest.raises(ZooError, match='outside the zoo folder'):
        Zoo.open(tiny_zoo)


def test_pickle_disguised_as_safetensors_is_refused(tiny_zoo):
    manifest_path = tiny_zoo / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    target = tiny_zoo / 'V5A1.safetensors'
    torch.save(_state(1), target)  # a pickle, with a matching checksum in the manifest
    manifest['experts']['V5A1']['sha256'] = file_sha256(target)
    manifest_path.write_text(json.dumps(manifest))
    zoo = Zoo.open(tiny_zoo)
    with pytest.raises(ZooError, match='not a valid safetensors file'):
        zoo.load_state_dict('V5A1')


@pytest.mark.parametrize(
    ('mutation', 'message'),
    [
        (lambda m: m.update(format_version=99), 'format_version'),
        (lambda m: m.pop('modality'), "missing manifest field 'modality'"),
        (lambda m: m['experts'].update(V1A1=m['experts']['V1A3']), "unknown cell 'V1A1'"),
        (lambda m: m.update(experts={}), 'non-empty'),
    ],
)
def test_malformed_manifest(tiny_zoo, mutation, message):
    manifest_path = tiny_zoo / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    mutation(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ZooError, match=message):
        Zoo.open(tiny_zoo)


def test_missing_and_garbage_manifest(tmp_path):
    with pytest.raises(ZooError, match='zoo folder not found'):
        Zoo.open(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ZooError, match='manifest not found'):
        Zoo.open(tmp_path / 'empty')
    (tmp_path / 'empty' / MANIFEST_NAME).write_text('{not json')
    with pytest.raises(ZooError, match='unreadable zoo manifest'):
        Zoo.open(tmp_path / 'empty')


def test_choice_records_substitution(tiny_zoo):
    zoo = Zoo.open(tiny_zoo)
    exact = zoo.choose('V5A1')
    assert exact.cell == 'V5A1' and not exact.substituted
    stand_in = zoo.choose('V6A1')
    assert stand_in.cell == 'V5A1'
    assert stand_in.substituted
    assert stand_in.sha256 == zoo.experts['V5A1']['sha256']


@pytest.mark.parametrize(
    ('cell', 'trained', 'expected'),
    [
        ('V5A1', {'V5A1', 'V4A1'}, 'V5A1'),
        ('V5A1', {'V4A1', 'V6A1'}, 'V4A1'),  # tie: the simpler, lower-volume neighbour
        ('V5A1', {'V3A1', 'V6A1'}, 'V6A1'),  # nearest volume wins within the bin
        ('V5A1', {'V5A3', 'V5A2'}, 'V5A2'),  # then the nearest anisotropy bin
        ('V2A2', {'V7A2', 'V2A3'}, 'V7A2'),  # same anisotropy bin before any other
        ('V1A3', {'V7A1'}, 'V7A1'),
    ],
)
def test_nearest_trained_cell(cell, trained, expected):
    assert nearest_trained_cell(cell, trained) == expected


def test_every_cell_has_a_stand_in():
    for cell in CELLS:
        assert nearest_trained_cell(cell, {'V1A3'}) == 'V1A3'


def test_default_zoo_missing_is_clear(monkeypatch):
    with pytest.raises(ZooError, match="'PD' has no route.*T1w, FLAIR, T2w"):
        default_zoo_path('PD')


def test_route_table_sends_flair_to_the_t1w_zoo_and_t2w_to_its_own():
    assert SHIPPED_ZOOS == {'T1w': 't1w', 'FLAIR': 't1w', 'T2w': 't2w'}
    assert ROUTED_MODALITIES == ('T1w', 'FLAIR', 'T2w')
    assert default_zoo_path('FLAIR') == default_zoo_path('T1w')
    assert default_zoo_path('T2w').name == 't2w'
    assert serving_modalities('FLAIR') == ('FLAIR', 'T1w')
    assert serving_modalities('T2w') == ('T2w',)
    # lent one way only: neither a T2w nor a FLAIR zoo ever serves T1w images
    assert serving_modalities('T1w') == ('T1w',)
    assert serving_modalities('PD') == ('PD',)
    assert route_table_text() == 'T1w by the T1w zoo, FLAIR by the T1w zoo, T2w by the T2w zoo'


def test_a_zoo_serves_its_own_route_and_those_the_table_lends_it(tiny_zoo, tmp_path):
    zoo = Zoo.open(tiny_zoo)
    zoo.check_serves('T1w')
    zoo.check_serves('FLAIR')
    with pytest.raises(ZooError, match='trained for T1w, not T2w'):
        zoo.check_serves('T2w')  # T2w has a zoo of its own in the route table
    with pytest.raises(ZooError, match='trained for T1w, not PD'):
        zoo.check_serves('PD')
    manifest = json.loads((tiny_zoo / MANIFEST_NAME).read_text())
    manifest['modality'] = 'T2w'
    (tiny_zoo / MANIFEST_NAME).write_text(json.dumps(manifest))
    t2w = Zoo.open(tiny_zoo)
    t2w.check_serves('T2w')
    for route in ('T1w', 'FLAIR'):
        with pytest.raises(ZooError, match=f'trained for T2w, not {route}'):
            t2w.check_serves(route)
    assert t2w.record() == {
        'name': 'test-zoo',
        'version': '0.0.1',
        'modality': 'T2w',
        'path': str(tiny_zoo),
        'manifest_sha256': file_sha256(tiny_zoo / MANIFEST_NAME),
    }
