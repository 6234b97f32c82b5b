"""Sphinx configuration of the cahal-bids documentation (``make docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / '_ext'))
sys.path.insert(0, str(DOCS.parent))

import cahal_bids  # noqa: E402 - after the path set-up

project = 'cahal-bids'
author = 'The cahal-bids developers'
copyright = '2026, The cahal-bids developers'
release = cahal_bids.__version__
version = '.'.join(release.split('.')[:2])

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinxarg.ext',
    'workflow_graph',  # docs/_ext: the `.. workflow::` graphs, with or without Graphviz
]

source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
root_doc = 'index'
highlight_language = 'text'
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']
nitpicky = True  # every cross-reference must resolve (-W makes a broken one an error)
suppress_warnings: list[str] = []
# The build runs offline (CI, containers, ``make docs`` on a cluster node), so there is no
# intersphinx: the standard library's and third-party packages' own classes and functions
# have no page to link to. These, and only these, are left unlinked; every cahal_bids name
# must resolve. Annotations that autodoc cannot evaluate (one name in the signature is
# imported only for type checking) are shown as written, with the module's import alias
# (``Path``, ``npt.ArrayLike``, ``nib.Nifti1Header``).
_UNLINKED_CLASSES = (
    # standard library
    'collections.abc.Mapping', 'collections.abc.Sequence',
    'os.PathLike', 'PathLike', 'pathlib.Path', 'Path',
    # NumPy, nibabel, PyTorch, niworkflows
    'numpy.ndarray', 'npt.ArrayLike', 'npt.DTypeLike',
    'nibabel.Nifti1Image', 'nibabel.nifti1.Nifti1Image', 'nibabel.nifti1.Nifti1Header',
    'nib.Nifti1Image', 'nib.Nifti1Header',
    'torch.device', 'torch.Tensor', 'Tensor', 'torch.nn.modules.module.Module',
    'niworkflows.engine.workflows.LiterateWorkflow', 'LiterateWorkflow',
)  # fmt: skip
_UNLINKED_FUNCTIONS = ('os.replace', 'nibabel.load', 'nibabel.save')
nitpick_ignore = [('py:class', name) for name in _UNLINKED_CLASSES] + [
    ('py:func', name) for name in _UNLINKED_FUNCTIONS
]

# --- Markdown -------------------------------------------------------------------------
myst_enable_extensions = ['colon_fence', 'deflist', 'substitution']
myst_substitutions = {'release': release}
myst_heading_anchors = 3

# --- API pages ------------------------------------------------------------------------
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
# No default 'members': with it, Sphinx 9 documents every public member and ignores the
# lists that the pages give (``:members: a, b``).
autodoc_default_options = {'show-inheritance': False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
# The workflow factories document their nodes' fields as numpy-style sections.
napoleon_custom_sections = [('Inputs', 'params_style'), ('Outputs', 'params_style')]

# --- workflow graphs (nipype.sphinxext.plot_workflow when Graphviz is there) ----------
wf_formats = ['png']
wf_html_show_formats = False
wf_html_show_source_link = False
wf_include_source = False

# --- HTML -----------------------------------------------------------------------------
html_theme = 'alabaster'
html_title = f'cahal-bids {release}'
html_static_path: list[str] = []
html_theme_options = {
    'description': 'Native-space 1 mm restoration of clinical brain MRI, as a BIDS-App',
    'page_width': '1100px',
}
