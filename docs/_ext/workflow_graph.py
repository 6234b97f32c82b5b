"""The ``.. workflow::`` directive of the workflow factories' docstrings, with or without dot.

With Graphviz's ``dot`` on ``PATH``, this loads Nipype's own directive
(:mod:`nipype.sphinxext.plot_workflow`), which runs the block's code and draws ``wf`` with
Graphviz. Without it, the same directive name runs the same code and draws the graph of
``wf`` with matplotlib instead (nodes in layers from inputs to outputs, one arrow per
connection), embedded in the page, so the documentation builds, warnings as errors, on a
machine that has only the Python dependencies.
"""

from __future__ import annotations

import base64
import io
import shutil
import textwrap
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

LOGGER = logging.getLogger(__name__)


def workflow_graph(workflow: Any, graph2use: str) -> Any:
    """The networkx graph Nipype would draw: sub-workflows as boxes ('orig') or all nodes."""
    if graph2use == 'orig':
        return workflow._graph
    return workflow._create_flat_graph()


def node_label(node: Any, graph2use: str) -> str:
    """The node's name and, for a node, its interface's class, as Nipype's simple form."""
    name = node.name if graph2use == 'orig' else node.fullname.split('.', 1)[-1]
    interface = getattr(node, 'interface', None)
    if interface is None:  # a sub-workflow
        return f'{name}\n(workflow)'
    return f'{name}\n({type(interface).__name__})'


def draw_png(workflow: Any, graph2use: str) -> bytes:
    """PNG of the workflow graph, layered from sources to sinks (deterministic)."""
    import networkx as nx
    from matplotlib.figure import Figure

    graph = workflow_graph(workflow, graph2use)
    labels = {node: node_label(node, graph2use) for node in graph.nodes}
    layers = [sorted(layer, key=labels.get) for layer in nx.topological_generations(graph)]
    widest = max((len(layer) for layer in layers), default=1)
    positions = {}
    for depth, layer in enumerate(layers):
        for index, node in enumerate(layer):
            positions[node] = ((index - (len(layer) - 1) / 2) * 2.6, -depth * 1.3)
    figure = Figure(figsize=(max(4.5, 2.6 * widest + 1.0), max(2.0, 1.3 * len(layers))), dpi=90)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    boxes = {}
    for node, (x, y) in positions.items():
        is_workflow = getattr(node, 'interface', None) is None
        boxes[node] = axes.text(
            x, y, labels[node], ha='center', va='center', fontsize=9,
            bbox={'boxstyle': 'round,pad=0.4', 'facecolor': '#dbe9f6' if is_workflow else
                  '#f4f4f4', 'edgecolor': '#4a6f8a'},
        )  # fmt: skip
    depth = {node: -y / 1.3 for node, (_, y) in positions.items()}
    long_edges = 0
    for source, target in sorted(graph.edges, key=lambda edge: (labels[edge[0]], labels[edge[1]])):
        # an edge that skips layers bends around the boxes between its ends
        curve = 0.0
        if round(depth[target] - depth[source]) > 1:
            long_edges += 1
            curve = (0.3 + 0.08 * long_edges) * (1 if long_edges % 2 else -1)
        axes.annotate(
            '', xy=positions[target], xytext=positions[source],
            arrowprops={'arrowstyle': '-|>', 'color': '#555555', 'shrinkA': 0, 'shrinkB': 0,
                        'connectionstyle': f'arc3,rad={curve}',
                        'patchA': boxes[source].get_bbox_patch(),
                        'patchB': boxes[target].get_bbox_patch()},
        )  # fmt: skip
    xs = [x for x, _ in positions.values()] or [0.0]
    ys = [y for _, y in positions.values()] or [0.0]
    axes.set_xlim(min(xs) - 1.9, max(xs) + 1.9)
    axes.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', metadata={'Software': None})
    return buffer.getvalue()


class WorkflowGraphDirective(SphinxDirective):
    """``.. workflow::`` without Graphviz: runs the code block, draws ``wf`` with matplotlib.

    Accepts the options of Nipype's directive; ``graph2use`` ``orig`` draws sub-workflows
    as single boxes, any other value every node.
    """

    has_content = True
    optional_arguments = 2
    final_argument_whitespace = False
    option_spec = {
        'alt': directives.unchanged,
        'height': directives.length_or_unitless,
        'width': directives.length_or_percentage_or_unitless,
        'scale': directives.nonnegative_int,
        'align': directives.unchanged,
        'class': directives.class_option,
        'include-source': directives.unchanged,
        'format': directives.unchanged,
        'context': directives.unchanged,
        'nofigs': directives.flag,
        'encoding': directives.encoding,
        'graph2use': directives.unchanged,
        'simple_form': directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        if self.arguments:
            raise self.error('workflow graphs from files need Graphviz (dot) and Nipype')
        code = textwrap.dedent('\n'.join(self.content))
        namespace: dict[str, Any] = {'__name__': 'workflow_graph_block'}
        try:
            exec(compile(code, f'<workflow block in {self.env.docname}>', 'exec'), namespace)
            workflow = namespace['wf']
            png = draw_png(workflow, self.options.get('graph2use', 'hierarchical').strip())
        except Exception as error:  # any failure of the block becomes a warning
            return [self.state.document.reporter.warning(
                f'workflow graph failed: {type(error).__name__}: {error}', line=self.lineno
            )]  # fmt: skip
        uri = 'data:image/png;base64,' + base64.b64encode(png).decode('ascii')
        image = nodes.image(uri=uri, alt=self.options.get('alt', f'graph of {workflow.name}'))
        for option in ('height', 'width', 'scale', 'align'):
            if option in self.options:
                image[option] = self.options[option]
        return [image]


def numbered_nipype_directive() -> type:
    """Nipype's directive, numbering its images per page rather than per parsed block.

    Nipype names a block's image ``<page>-<n>.png`` with ``n`` counted on the docutils
    document, and every ``{eval-rst}`` block of a Markdown page is parsed as a document
    of its own: without this, all the graphs of a page would be written to one file.
    """
    from nipype.sphinxext.plot_workflow import WorkflowDirective

    class NumberedWorkflowDirective(WorkflowDirective):
        def run(self) -> list[nodes.Node]:
            env = self.state.document.settings.env
            count = env.temp_data.get('workflow_graph_count', 0)
            self.state_machine.document.attributes['_wf_counter'] = count
            env.temp_data['workflow_graph_count'] = count + 1
            return super().run()

    return NumberedWorkflowDirective


def setup(app: Sphinx) -> dict[str, Any]:
    if shutil.which('dot'):
        app.setup_extension('nipype.sphinxext.plot_workflow')
        app.add_directive('workflow', numbered_nipype_directive(), override=True)
    else:
        LOGGER.info('workflow graphs: no Graphviz dot on PATH, drawing them with matplotlib')
        app.add_directive('workflow', WorkflowGraphDirective)
        for name, default in (('graph2use', 'hierarchical'), ('simple_form', True)):
            app.add_config_value(name, default, 'html')
        for name in ('wf_formats', 'wf_html_show_formats', 'wf_html_show_source_link',
                     'wf_include_source'):  # fmt: skip
            app.add_config_value(name, None, 'html')
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
