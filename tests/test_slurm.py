"""Scale-out on Slurm: a real single-node cluster runs a participant, one job per node.

The fixture starts a private cluster on this machine (a munged, a slurmctld and one
slurmd on localhost), keeps every file it needs (munge key and socket, slurm.conf,
state, spool, logs, pid files) in one temporary folder, and stops the daemons by the
PIDs in their pid files. It needs root and Debian's ``slurm-wlm`` and ``munge``
(``make system-deps``); without them the tests skip and say why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from helpers import run_captured, write_app_assets

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROGRAMS = ('munged', 'mungekey', 'slurmctld', 'slurmd', 'sbatch', 'squeue', 'sinfo', 'sacct')
SBIN_PATH = os.pathsep.join(('/usr/local/sbin', '/usr/sbin', '/sbin'))
IMAGES = [('sub-01/anat/sub-01_T1w.nii.gz', (1.0, 1.0, 4.0))]
START_TIMEOUT = 30.0
RUN_TIMEOUT = 600.0
RECIPES = Path(__file__).resolve().parents[1] / 'containers' / 'slurm'


# --- a private single-node cluster ----------------------------------------------------


def _which(program: str) -> str | None:
    """``program`` on PATH or in the sbin folders (daemons live there, off a user's PATH)."""
    return shutil.which(program, path=os.pathsep.join((os.environ.get('PATH', ''), SBIN_PATH)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def _memory_mb() -> int:
    for line in Path('/proc/meminfo').read_text().splitlines():
        if line.startswith('MemTotal:'):
            return int(line.split()[1]) // 1024
    raise RuntimeError('/proc/meminfo has no MemTotal line')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_for(condition, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:])
    except OSError:
        return f'({path} is absent)'


class SlurmStartError(RuntimeError):
    """The cluster could not be started (the reason is the message)."""


@dataclass
class LocalSlurm:
    """A munged + slurmctld + slurmd on localhost, every file under ``root``."""

    root: Path
    programs: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    pid_files: list[Path] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / 'slurm.conf'

    @property
    def jobcomp_log(self) -> Path:
        return self.root / 'jobcomp.log'

    def client(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command (``sbatch``, ``squeue``, ``sacct`` ...) on this cluster."""
        command = [self.programs.get(argv[0], argv[0]), *argv[1:]]
        return subprocess.run(
            command, env=self.env, capture_output=True, text=True, check=check, timeout=60
        )

    # start -------------------------------------------------------------------------

    def start(self) -> None:
        self.root.chmod(0o755)  # the munge user must reach its socket folder
        socket_path = self._start_munged()
        self._write_conf(socket_path)
        self.env = {
            **os.environ,
            'SLURM_CONF': str(self.conf),
            'LOGNAME': os.environ.get('LOGNAME') or pwd.getpwuid(os.getuid()).pw_name,
        }
        for daemon, extra in (('slurmctld', ()), ('slurmd', ('-N', 'localhost'))):
            pid_file = self.root / f'{daemon}.pid'
            result = subprocess.run(
                [self.programs[daemon], '-f', str(self.conf), *extra],
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            self.pid_files.append(pid_file)
            if result.returncode != 0 or not _wait_for(
                lambda pid_file=pid_file: (_read_pid(pid_file) or 0) > 0, START_TIMEOUT
            ):
                raise SlurmStartError(
                    f'{daemon} did not start (exit {result.returncode}): '
                    f'{result.stderr.strip()[-500:]}\n{_tail(self.root / f"{daemon}.log")}'
                )
        if not _wait_for(self._node_is_idle, START_TIMEOUT, interval=0.5):
            raise SlurmStartError(
                'the node never became idle:\n'
                f'{_tail(self.root / "slurmctld.log")}\n{_tail(self.root / "slurmd.log")}'
            )

    def _start_munged(self) -> Path:
        """munged as the munge user, with its own key, socket, pid, seed and log files."""
        try:
            munge_user = pwd.getpwnam('munge')
        except KeyError:
            raise SlurmStartError('there is no "munge" user (is munge installed?)') from None
        folder = self.root / 'munge'
        folder.mkdir(mode=0o755)
        os.chown(folder, munge_user.pw_uid, munge_user.pw_gid)
        folder.chmod(0o755)  # munged wants a socket folder that every user can enter
        key = folder / 'munge.key'
        subprocess.run(
            [self.programs['mungekey'], '--create', '--keyfile', str(key)],
            capture_output=True,
            check=True,
            timeout=60,
        )
        os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
        key.chmod(0o400)
        socket_path = folder / 'munge.socket'
        pid_file = folder / 'munged.pid'
        result = subprocess.run(
            [
                self.programs['munged'],
                f'--socket={socket_path}',
                f'--key-file={key}',
                f'--pid-file={pid_file}',
                f'--log-file={folder / "munged.log"}',
                f'--seed-file={folder / "munged.seed"}',
            ],
            user=munge_user.pw_uid,
            group=munge_user.pw_gid,
            extra_groups=[],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        self.pid_files.append(pid_file)
        if result.returncode != 0 or not _wait_for(socket_path.exists, START_TIMEOUT):
            raise SlurmStartError(f'munged did not start: {result.stderr.strip()[-500:]}')
        return socket_path

    def _write_conf(self, munge_socket: Path) -> None:
        state, spool = self.root / 'state', self.root / 'spool'
        state.mkdir()
        spool.mkdir()
        cpus = os.cpu_count() or 1
        memory = max(256, int(_memory_mb() * 0.8))
        self.conf.write_text(
            '\n'.join(
                [
                    '# a private one-node cluster for the cahal-bids tests',
                    'ClusterName=cahaltest',
                    'SlurmctldHost=localhost',
                    f'SlurmctldPort={_free_port()}',
                    f'SlurmdPort={_free_port()}',
                    'SlurmUser=root',
                    'SlurmdUser=root',
                    'AuthType=auth/munge',
                    'CredType=cred/munge',
                    f'AuthInfo=socket={munge_socket}',
                    f'StateSaveLocation={state}',
                    f'SlurmdSpoolDir={spool}',
                    f'SlurmctldPidFile={self.root / "slurmctld.pid"}',
                    f'SlurmdPidFile={self.root / "slurmd.pid"}',
                    f'SlurmctldLogFile={self.root / "slurmctld.log"}',
                    f'SlurmdLogFile={self.root / "slurmd.log"}',
                    'SlurmctldDebug=info',
                    'SlurmdDebug=info',
                    # no cgroups: this machine has no systemd and the jobs are trusted
                    'ProctrackType=proctrack/linuxproc',
                    'TaskPlugin=task/none',
                    'JobAcctGatherType=jobacct_gather/none',
                    'AccountingStorageType=accounting_storage/none',
                    # completed jobs are listed by ``sacct -c`` from this file
                    'JobCompType=jobcomp/filetxt',
                    f'JobCompLoc={self.jobcomp_log}',
                    'MpiDefault=none',
                    'SwitchType=switch/none',
                    'ReturnToService=2',
                    'SchedulerType=sched/backfill',
                    'SchedulerParameters=batch_sched_delay=0',
                    'SelectType=select/cons_tres',
                    'SelectTypeParameters=CR_CPU',
                    'MinJobAge=300',
                    f'NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} '
                    'State=UNKNOWN',
                    'PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP',
                    '',
                ]
            )
        )

    def _node_is_idle(self) -> bool:
        result = self.client('sinfo', '--noheader', '--format=%T', check=False)
        return result.returncode == 0 and result.stdout.strip().rstrip('*') == 'idle'

    # stop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel what is left, then stop slurmd, slurmctld and munged by their PIDs."""
        if self.env and self.conf.is_file():
            queued = self.client('squeue', '--noheader', '--format=%i', check=False)
            jobs = queued.stdout.split() if queued.returncode == 0 else []
            if jobs:
                self.client('scancel', *jobs, check=False)
        pids = [_read_pid(pid_file) for pid_file in reversed(self.pid_files)]
        running = [pid for pid in pids if pid is not None and _pid_alive(pid)]
        for pid in running:  # all at once: each takes a second or two to shut down
            os.kill(pid, signal.SIGTERM)
        for pid in running:
            if not _wait_for(lambda pid=pid: not _pid_alive(pid), 15.0):
                os.kill(pid, signal.SIGKILL)
                _wait_for(lambda pid=pid: not _pid_alive(pid), 5.0)

    def completed_jobs(self) -> list[dict[str, str]]:
        """Finished jobs as ``sacct -c`` reads them from the job-completion log."""
        fields = ('JobID', 'JobName', 'State', 'ExitCode', 'NodeList')
        result = self.client(
            'sacct', '-c', '--noheader', '--parsable2', '--starttime=2000-01-01',
            f'--format={",".join(fields)}',
        )  # fmt: skip
        return [
            dict(zip(fields, line.split('|'), strict=True))
            for line in result.stdout.splitlines()
            if line.strip()
        ]


@pytest.fixture(scope='module')
def slurm_cluster() -> Iterator[LocalSlurm]:
    """A running private Slurm cluster, or a skip that says what is missing."""
    if sys.platform != 'linux':
        pytest.skip('the Slurm tests run on Linux only')
    found = {program: _which(program) for program in PROGRAMS}
    missing = sorted(program for program, path in found.items() if path is None)
    if missing:
        pytest.skip(f'Slurm/munge programs missing: {", ".join(missing)} (make system-deps)')
    if os.geteuid() != 0:
        pytest.skip('starting slurmctld, slurmd and munged needs root')
    programs = {program: str(path) for program, path in found.items()}
    # outside pytest's own temporary folder: that one is private to root, munged needs in
    cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix='cahal-slurm-')), programs)
    try:
        try:
            cluster.start()
        except (SlurmStartError, OSError, subprocess.SubprocessError) as error:
            pytest.skip(f'could not start a local Slurm cluster: {error}')
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


# --- the BIDS-App on it ----------------------------------------------------------------


@pytest.fixture(scope='module')
def assets(tmp_path_factory) -> dict[str, Path]:
    return write_app_assets(tmp_path_factory.mktemp('slurm'), IMAGES, modalities=('T1w',))


def _command(assets, out: Path, work: Path, *extra: str) -> list[str]:
    return [
        sys.executable, '-m', 'cahal_bids', str(assets['bids']), str(out), 'participant',
        '-w', str(work), '--zoo', str(assets['t1w_zoo']),
        '--template-file', str(assets['template']), '--template-name', 'Phantom', '--sloppy',
        '--no-denoise', '--nprocs', '2',
        '--omp-nthreads', '1', '--random-seed', '3', '--skip-bids-validation', *extra,
    ]  # fmt: skip


def _derivative_files(out: Path) -> dict[str, bytes]:
    """Images and transforms, by path relative to the output folder."""
    paths = [*out.glob('sub-*/**/*.nii.gz'), *out.glob('sub-*/**/*_xfm.txt')]
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(paths)}


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_captured(command, env=env, timeout=RUN_TIMEOUT)


def _environment(base: dict[str, str]) -> dict[str, str]:
    """The venv's interpreter first on PATH: Nipype's job scripts call ``sys.executable``,
    and anything a node starts by name should come from the same environment."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        **base,
        'PATH': os.pathsep.join((venv_bin, base.get('PATH', ''))),
        'NIPYPE_NO_ET': '1',
    }


def test_the_participant_runs_as_slurm_jobs_and_matches_multiproc(slurm_cluster, assets):
    root = assets['root']
    # the shipped plugin file, with sbatch arguments that fit this small test node
    settings = yaml.safe_load((RECIPES / 'nipype-slurm.yml').read_text())
    assert settings['plugin'] == 'SLURM'
    settings['plugin_args']['sbatch_args'] = '--cpus-per-task=1 --mem=500M --time=10'
    plugin = root / 'slurm.yml'
    plugin.write_text(yaml.safe_dump(settings))
    slurm_out, slurm_work = root / 'out-slurm', root / 'work-slurm'
    result = _run(
        _command(assets, slurm_out, slurm_work, '--use-plugin', str(plugin)),
        _environment(slurm_cluster.env),
    )
    assert result.returncode == 0, result.stderr[-4000:]

    # every node that is not a sink went through sbatch and finished as a Slurm job
    scripts = sorted(slurm_work.rglob('batchscript_*.sh'))
    assert len(scripts) >= 3, 'Nipype submitted (almost) nothing to Slurm'
    interpreter = scripts[0].read_text().splitlines()[-1].split()[0]
    assert Path(interpreter) == Path(sys.executable), interpreter
    jobs = [job for job in slurm_cluster.completed_jobs() if 'cahal_bids_wf' in job['JobName']]
    assert len(jobs) == len(scripts), (jobs, [script.name for script in scripts])
    for job in jobs:
        assert (job['State'], job['ExitCode'], job['NodeList']) == (
            'COMPLETED',
            '0:0',
            'localhost',
        ), job
    names = {job['JobName'].split('.')[0] for job in jobs}
    assert {'enhance', 'register'} <= names, names
    assert len(list(slurm_work.rglob('slurm-*.out'))) == len(jobs)

    # the same derivatives, byte for byte, as the default MultiProc scheduler
    local_out, local_work = root / 'out-multiproc', root / 'work-multiproc'
    result = _run(_command(assets, local_out, local_work), _environment(dict(os.environ)))
    assert result.returncode == 0, result.stderr[-4000:]
    assert not list(local_work.rglob('batchscript_*.sh'))
    expected = _derivative_files(local_out)
    assert any(name.endswith('_xfm.txt') for name in expected), sorted(expected)
    assert any(name.endswith('_desc-cahal_T1w.nii.gz') for name in expected), sorted(expected)
    produced = _derivative_files(slurm_out)
    assert sorted(produced) == sorted(expected)
    for name, content in expected.items():
        assert produced[name] == content, f'{name} differs between Slurm and MultiProc'


def test_the_array_script_reads_participants_tsv(slurm_cluster, tmp_path):
    """The job-array recipe maps each array index to one line of participants.tsv
    (run on the cluster with ``apptainer`` replaced by a stub that prints its arguments)."""
    script = RECIPES / 'cahal-bids-array.sbatch'
    bids = tmp_path / 'bids'
    bids.mkdir()
    (bids / 'participants.tsv').write_text('participant_id\tage\nsub-01\t30\nsub-p09\t41\n02\t7\n')
    stub = tmp_path / 'bin'
    stub.mkdir()
    (stub / 'apptainer').write_text('#!/bin/sh\necho "apptainer $*"\n')
    (stub / 'apptainer').chmod(0o755)
    logs = tmp_path / 'logs'
    logs.mkdir()
    env = {
        **slurm_cluster.env,
        'PATH': os.pathsep.join((str(stub), slurm_cluster.env.get('PATH', ''))),
        'BIDS_DIR': str(bids),
        'OUT_DIR': str(tmp_path / 'out'),
        'IMAGE': str(tmp_path / 'cahal-bids.sif'),
        'TMPDIR': str(tmp_path),
    }
    result = subprocess.run(
        [slurm_cluster.programs['sbatch'], '--parsable', '--wait', '--array=1-3',
         f'--output={logs}/%a.out', '--time=5', '--cpus-per-task=1', '--mem=100M',
         str(script)],
        env=env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = {index: (logs / f'{index}.out').read_text() for index in (1, 2, 3)}
    for index, label in ((1, '01'), (2, 'p09'), (3, '02')):
        lines = [line for line in printed[index].splitlines() if line.startswith('apptainer ')]
        assert len(lines) == 1, printed[index]
        words = lines[0].split()
        assert words[1:3] == ['run', '--cleanenv'], lines[0]
        assert words[words.index('--participant-label') + 1] == label, lines[0]
        assert words[words.index('-w') + 1] == '/work', lines[0]
        assert str(tmp_path / 'cahal-bids.sif') in words, lines[0]
        assert f'{bids}:/data:ro' in words, lines[0]
        scratch = [word for word in words if word.endswith(':/work')]
        assert len(scratch) == 1 and scratch[0].startswith(f'{tmp_path}/cahal-bids-'), lines[0]
    assert not list(tmp_path.glob('cahal-bids-*')), 'the scratch work folders were left behind'


_APPTAINER_STAND_IN = """#!/bin/bash
# Stands in for Apptainer in this test: `apptainer run [--cleanenv] [--nv] [-B A:B]... SIF
# ARGS` runs the locally built image's entry point instead (containers/run-local.sh), as the
# calling user, as Apptainer does.
set -euo pipefail
[ "$1" = run ] || {{ echo "apptainer stand-in: only 'run'" >&2; exit 64; }}
shift
volumes=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cleanenv|--nv) shift ;;
        -B) volumes+=(-v "$2"); shift 2 ;;
        *) break ;;
    esac
done
shift  # the SIF file
exec {run} --user "$(id -u):$(id -g)" "${{volumes[@]}}" {tag} "$@"
"""


def test_the_array_script_runs_the_image_entry_point(slurm_cluster, assets, tmp_path):
    """The job-array recipe submitted to the cluster with its Apptainer call replaced by the
    built image's entry point (``containers/run-local.sh``): one participant, exit 0, the
    same derivatives as the same arguments outside the image."""
    from container_image import RUN, build_image

    image = build_image()
    bids, root = assets['bids'], assets['root']
    (bids / 'participants.tsv').write_text('participant_id\nsub-01\n')
    stub = tmp_path / 'bin'
    stub.mkdir()
    (stub / 'apptainer').write_text(_APPTAINER_STAND_IN.format(run=RUN, tag=image.tag))
    (stub / 'apptainer').chmod(0o755)
    out, logs = tmp_path / 'out', tmp_path / 'logs'
    logs.mkdir()
    options = (
        '--template-name Phantom --sloppy --no-denoise --random-seed 3 --skip-bids-validation'
    )
    env = {
        **slurm_cluster.env,
        'PATH': os.pathsep.join((str(stub), slurm_cluster.env.get('PATH', ''))),
        'BIDS_DIR': str(bids),
        'OUT_DIR': str(out),
        'IMAGE': str(tmp_path / 'cahal-bids.sif'),
        'APPTAINER_EXTRA': f'-B {root}:/assets:ro',
        'CAHAL_ARGS': f'--zoo /assets/{assets["t1w_zoo"].relative_to(root)} '
        f'--template-file /assets/{assets["template"].relative_to(root)} {options}',
        'TMPDIR': str(tmp_path),
    }
    result = subprocess.run(
        [slurm_cluster.programs['sbatch'], '--parsable', '--wait', '--array=1-1',
         f'--output={logs}/%a.out', '--time=20', '--cpus-per-task=1', '--mem=2000M',
         str(RECIPES / 'cahal-bids-array.sbatch')],
        env=env, capture_output=True, text=True, check=False, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    log = (logs / '1.out').read_text() if (logs / '1.out').exists() else ''
    assert result.returncode == 0, (result.stderr, log[-4000:])
    inside = _derivative_files(out)
    assert any(name.endswith('_desc-cahal_T1w.nii.gz') for name in inside), (sorted(inside), log)

    host_out = tmp_path / 'host-out'
    host = _run(
        [sys.executable, '-m', 'cahal_bids', str(bids), str(host_out), 'participant',
         '--participant-label', '01', '-w', str(tmp_path / 'host-work'),
         '--nprocs', '1', '--omp-nthreads', '1', '--zoo', str(assets['t1w_zoo']),
         '--template-file', str(assets['template']), *options.split()],
        _environment(dict(os.environ)),
    )  # fmt: skip
    assert host.returncode == 0, host.stderr[-4000:]
    outside = _derivative_files(host_out)
    assert sorted(inside) == sorted(outside)
    assert [name for name in outside if inside[name] != outside[name]] == []
