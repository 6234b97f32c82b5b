"""The Sphinx documentation builds with warnings as errors, and says what the code says.

The ``.. workflow::`` graphs are drawn by Nipype with Graphviz when ``dot`` is on PATH, and
by ``docs/_ext/workflow_graph.py`` with matplotlib otherwise, so the build needs no system
package; the fallback drawing is also tested on its own.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'
PAGES = (
    'installation', 'quickstart', 'usage', 'cli', 'outputs', 'troubleshooting', 'hpc',
    'embedding', 'api', 'training', 'architecture', 'method', 'workflows', 'changes',
)  # fmt: skip


def _load_extension():
    spec = importlib.util.spec_from_file_location(
        'cahal_docs_workflow_graph', DOCS / '_ext' / 'workflow_graph.py'
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_fallback_graph_drawing_without_graphviz():
    from cahal_bids.app.workflows.enhance import init_enhance_wf

    extension = _load_extension()
    workflow = init_enhance_wf(modality='T1w', denoise=True, device='cpu', zoo='z', omp_nthreads=1)
    for graph2use in ('orig', 'flat'):
        labels = sorted(
            extension.node_label(node, graph2use)
            for node in extension.workflow_graph(workflow, graph2use).nodes
        )
        assert 'enhance\n(CahalEnhance)' in labels and 'denoise\n(DenoiseImage)' in labels
        png = extension.draw_png(workflow, graph2use)
        assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 5000
    assert extension.draw_png(workflow, 'orig') == extension.draw_png(workflow, 'orig')


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_docs_build_without_warnings(tmp_path):
    html = tmp_path / 'html'
    result = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html',
         '-d', str(tmp_path / 'doctrees'), str(DOCS), str(html)],
        capture_output=True, text=True, timeout=540, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    index = (html / 'index.html').read_text()
    for page in PAGES:
        assert (html / f'{page}.html').is_file(), page
        assert f'href="{page}.html"' in index, f'{page} is not in the table of contents'

    # every workflow factory's graph was drawn, each its own image
    workflows = (html / 'workflows.html').read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', workflows)
    graphs = [src for src in images if src.startswith('data:image/png') or 'workflows-' in src]
    factories = Path(__file__).resolve().parents[1] / 'cahal_bids' / 'app' / 'workflows'
    drawn = sum(path.read_text().count('.. workflow::') for path in factories.glob('*.py'))
    assert drawn >= 4 and len(set(graphs)) == drawn, images
    for factory in ('init_single_subject_wf', 'init_enhance_wf', 'init_register_wf',
                    'init_compose_wf', 'init_ds_enhanced_wf', 'init_cahal_wf'):  # fmt: skip
        assert re.search(rf'id="cahal_bids\.app\.workflows\.\w+\.{factory}"', workflows), factory

    # the API page documents what `from cahal_bids import ...` gives, with the one-liner
    api = (html / 'api.html').read_text()
    for name in ('Enhancer', 'Enhancer.enhance', 'Enhancer.enhance_file', 'EnhancedImage'):
        assert f'id="cahal_bids.engine.inference.{name}"' in api, name
    assert 'id="cahal_bids.engine.zoo.Zoo"' in api
    assert "cahal_bids.Enhancer(zoo='T1w').enhance(nib.load('x.nii.gz')).image.shape" in api

    # the command-line reference comes from the parsers themselves
    cli = (html / 'cli.html').read_text()
    from cahal_bids.cli.parser import build_parser

    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in cli, f'{option} is missing from the command-line reference'

    # the changelog is CHANGES.md
    first_entry = next(
        line[2:].strip() for line in (REPO / 'CHANGES.md').read_text().splitlines()
        if line.startswith('- ')
    )  # fmt: skip
    words = ' '.join(re.sub(r'<[^>]+>', '', (html / 'changes.html').read_text()).split())
    assert ' '.join(re.sub(r'`', '', first_entry).split()[:6]) in words
