"""The package's architecture: import layers, module sizes, deprecated import paths."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'cahal_bids'
LAYERS = ('core', 'physics', 'engine', 'preprocessing', 'training', 'evaluation', 'app', 'cli')
MAX_LINES = 600
LONG_MODULE_REASON = 'Longer than 600 lines because'
"""A module above :data:`MAX_LINES` must say why in its docstring, starting with this."""


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contracts of setup.cfg on the package under ``package_parent``."""
    script = (
        'import sys; from importlinter.cli import lint_imports_command; lint_imports_command()'
    )
    return subprocess.run(
        [sys.executable, '-c', script, '--config', str(ROOT / 'setup.cfg'), '--no-cache'],
        capture_output=True,
        text=True,
        cwd=package_parent,
        env={'PYTHONPATH': str(package_parent), 'PATH': '/usr/bin:/bin'},
        check=False,
    )


def test_every_layer_is_a_package_and_named_in_the_contract():
    contract = (ROOT / 'setup.cfg').read_text().split('[importlinter]', 1)[1]
    for layer in LAYERS:
        assert (PACKAGE / layer / '__init__.py').is_file(), layer
        assert f'cahal_bids.{layer}' in contract, layer
    loose = sorted(
        path.name
        for path in PACKAGE.glob('*.py')
        if path.name not in {'__init__.py', '__main__.py', '_deprecated.py', 'inference.py'}
    )
    assert loose == [], f'modules outside the layers: {loose}'


def test_imports_only_go_down_the_layers():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert 'KEPT' in result.stdout and 'BROKEN' not in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package whose core imports the app is refused."""
    copy = tmp_path / 'cahal_bids'
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns('zoos', '__pycache__'))
    errors = copy / 'core' / 'errors.py'
    errors.write_text(errors.read_text() + '\nimport cahal_bids.app.config  # noqa\n')
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert 'BROKEN' in result.stdout and 'cahal_bids.core.errors' in result.stdout


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ''


def test_modules_stay_short_or_say_why():
    long = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and LONG_MODULE_REASON not in _docstring(path):
            long[path.relative_to(ROOT).as_posix()] = lines
    assert long == {}


def test_every_module_has_a_docstring():
    missing = [
        path.relative_to(ROOT).as_posix()
        for path in sorted(PACKAGE.rglob('*.py'))
        if not _docstring(path)
    ]
    assert missing == []


@pytest.mark.parametrize(
    ('old', 'new', 'name'),
    [
        ('cahal_bids.inference', 'cahal_bids.engine.inference', 'Enhancer'),
        ('cahal_bids.workflows.enhance', 'cahal_bids.app.workflows.enhance', 'init_enhance_wf'),
        ('cahal_bids.workflows.base', 'cahal_bids.app.workflows.base', 'init_cahal_wf'),
        ('cahal_bids.workflows.registration', 'cahal_bids.app.workflows.registration',
         'init_register_wf'),
        ('cahal_bids.workflows.outputs', 'cahal_bids.app.workflows.outputs',
         'init_ds_enhanced_wf'),
    ],
)  # fmt: skip
def test_old_embedding_imports_still_work_with_a_deprecation_warning(old, new, name):
    import importlib

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        shim = importlib.import_module(old)
    assert any(
        issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught
    )
    target = importlib.import_module(new)
    if name is not None:
        assert getattr(shim, name) is getattr(target, name)
    assert set(shim.__all__) == set(getattr(target, '__all__', shim.__all__))
