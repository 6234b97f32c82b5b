"""The participant report in a real browser: headless Chromium at laptop width.

Chromium is driven over the DevTools protocol through ``--remote-debugging-pipe`` (JSON
messages separated by NUL bytes on file descriptors 3 and 4), so no browser-automation
package is needed. It needs Debian's ``chromium`` (``make system-deps``); without it the
tests skip and say why.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cahal_bids.cli import run

from helpers import write_app_assets

pytestmark = [pytest.mark.browser, pytest.mark.slow]

BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
IMAGES = [
    ('sub-01/anat/sub-01_T1w.nii.gz', (1.0, 1.0, 4.0)),
    ('sub-01/anat/sub-01_FLAIR.nii.gz', (1.0, 1.0, 5.0)),
]
LAPTOP = (1366, 900)
TIMEOUT = 60.0
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class DevToolsError(RuntimeError):
    """The browser answered a command with an error, died, or did not answer in time."""


def _above_nine(descriptor: int) -> int:
    """The same pipe end on a descriptor number of 10 or more (the original is closed)."""
    moved = fcntl.fcntl(descriptor, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(descriptor)
    return moved


class HeadlessChromium:
    """One headless Chromium and one page, driven over the DevTools pipe."""

    def __init__(self, executable: str, profile: Path) -> None:
        self.log = profile.with_name(profile.name + '-stderr.log')
        # Chromium reads commands from its fd 3 and writes answers and events to its fd 4;
        # its ends of the pipes are moved above 9 first, so moving them to 3 and 4 is safe
        self._to_browser_read, self._to_browser = os.pipe()
        self._from_browser, self._from_browser_write = os.pipe()
        self._to_browser_read = _above_nine(self._to_browser_read)
        self._from_browser_write = _above_nine(self._from_browser_write)
        remap = (
            f'exec 3<&{self._to_browser_read} 4>&{self._from_browser_write} '
            f'{self._to_browser_read}<&- {self._from_browser_write}>&-; exec "$@"'
        )
        command = [
            executable, '--headless=new', '--disable-gpu', '--no-sandbox',
            '--remote-debugging-pipe', f'--user-data-dir={profile}', '--no-first-run',
            '--no-default-browser-check', '--disable-extensions', '--disable-dev-shm-usage',
            '--mute-audio', f'--window-size={LAPTOP[0]},{LAPTOP[1]}', 'about:blank',
        ]  # fmt: skip
        with self.log.open('wb') as log:
            self.process = subprocess.Popen(
                ['/bin/bash', '-c', remap, 'chromium', *command],
                pass_fds=(self._to_browser_read, self._from_browser_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        os.close(self._to_browser_read)
        os.close(self._from_browser_write)
        self._buffer = b''
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    # the protocol --------------------------------------------------------------------

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b'\0' not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevToolsError('Chromium did not answer in time')
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise DevToolsError(f'Chromium closed the pipe: {self._stderr_tail()}')
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b'\0', 1)
        return json.loads(message)

    def send(self, method: str, timeout: float = TIMEOUT, **params: Any) -> dict[str, Any]:
        """Send one command (to the page once attached) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {'id': self._next_id, 'method': method, 'params': params}
        if self.session is not None and not method.startswith(('Target.', 'Browser.')):
            message['sessionId'] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b'\0')
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline)
            if answer.get('id') == self._next_id:
                if 'error' in answer:
                    raise DevToolsError(f'{method}: {answer["error"]}')
                return answer.get('result', {})
            self.events.append(answer)

    def wait_for(self, method: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first event ``method`` (already received, or the next ones)."""
        for event in self.events:
            if event.get('method') == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._receive(deadline)
            self.events.append(event)
            if event.get('method') == method:
                return event

    def _stderr_tail(self) -> str:
        try:
            return self.log.read_text(errors='replace')[-1000:]
        except OSError:
            return ''

    # a page ------------------------------------------------------------------------

    def open_page(self, url: str, width: int, height: int) -> None:
        """Attach to a fresh tab, turn on console and log events, size it, load ``url``."""
        target = self.send('Target.createTarget', url='about:blank')['targetId']
        self.session = self.send('Target.attachToTarget', targetId=target, flatten=True)[
            'sessionId'
        ]
        for domain in ('Page', 'Runtime', 'Log'):
            self.send(f'{domain}.enable')
        self.send(
            'Emulation.setDeviceMetricsOverride',
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.events.clear()
        self.send('Page.navigate', url=url)
        self.wait_for('Page.loadEventFired')

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            'Runtime.evaluate', expression=expression, returnByValue=True, awaitPromise=True
        )
        if 'exceptionDetails' in result:
            raise DevToolsError(f'{expression}: {result["exceptionDetails"]}')
        return result['result'].get('value')

    def console_errors(self) -> list[str]:
        """Errors the page logged: console.error, uncaught exceptions, failed loads."""
        errors = []
        for event in self.events:
            method, params = event.get('method'), event.get('params', {})
            if method == 'Runtime.consoleAPICalled' and params.get('type') in ('error', 'assert'):
                errors.append(' '.join(str(arg.get('value')) for arg in params.get('args', [])))
            elif method == 'Runtime.exceptionThrown':
                errors.append(str(params.get('exceptionDetails', {}).get('text')))
            elif method == 'Log.entryAdded' and params.get('entry', {}).get('level') == 'error':
                entry = params['entry']
                errors.append(f'{entry.get("text")} ({entry.get("url", "")})')
        return errors

    def screenshot(self, path: Path) -> Path:
        data = self.send('Page.captureScreenshot', format='png')['data']
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.session = None
                self.send('Browser.close', timeout=10)
        except (DevToolsError, OSError):
            pass
        finally:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for descriptor in (self._to_browser, self._from_browser):
                try:
                    os.close(descriptor)
                except OSError:
                    pass


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE, f'{path} is not a PNG file'
    return struct.unpack('>II', header[16:24])


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def chromium() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f'no headless browser found ({", ".join(BROWSERS)}; make system-deps)')


@pytest.fixture(scope='module')
def report(tmp_path_factory) -> Path:
    """One small participant run (T1w and FLAIR, registered): its ``sub-01.html``."""
    root = tmp_path_factory.mktemp('report_browser')
    assets = write_app_assets(root, IMAGES)
    out = root / 'out'
    argv = [
        str(assets['bids']), str(out), 'participant', '-w', str(root / 'work'),
        '--zoo', str(assets['t1w_zoo']), str(assets['flair_zoo']),
        '--template-file', str(assets['template']),
        '--template-name', 'Phantom', '--sloppy', '--nprocs', '2', '--skip-bids-validation',
    ]  # fmt: skip
    assert run.main(argv) == 0
    return out / 'sub-01.html'


@pytest.fixture
def browser(chromium, tmp_path) -> Iterator[HeadlessChromium]:
    instance = HeadlessChromium(chromium, tmp_path / 'profile')
    try:
        yield instance
    finally:
        instance.close()


# --- tests -----------------------------------------------------------------------------


def test_report_renders_at_laptop_width(report, browser, tmp_path):
    browser.open_page(report.as_uri(), *LAPTOP)
    # every figure is decoded: a missing or broken file has naturalWidth 0
    images = browser.evaluate(
        'Promise.all(Array.from(document.images, (img) => img.decode().catch(() => null)))'
        '.then(() => Array.from(document.images, (img) => ({src: img.getAttribute("src"), '
        'complete: img.complete, width: img.naturalWidth, height: img.naturalHeight})))'
    )
    assert len(images) >= 4, images  # comparison and registration figure of each image
    for image in images:
        assert image['complete'] and image['width'] > 0 and image['height'] > 0, image
    assert browser.console_errors() == []
    # nothing wider than the window: no sideways scrolling at 1366 px
    layout = browser.evaluate(
        '({scroll: document.documentElement.scrollWidth, inner: window.innerWidth, '
        'viewport: !!document.querySelector("meta[name=viewport]"), title: document.title})'
    )
    assert layout['inner'] == LAPTOP[0], layout
    assert layout['scroll'] <= layout['inner'], layout
    assert layout['viewport'], layout
    assert layout['title'] == 'cahal-bids: sub-01', layout
    # the methods text is rendered, not shown as Markdown source
    methods = browser.evaluate(
        '({headings: Array.from(document.querySelectorAll("h3"), (h) => h.textContent), '
        'paragraphs: document.querySelectorAll("p").length, '
        'markdown: document.body.innerText.includes("###")})'
    )
    assert 'References' in methods['headings'], methods
    assert methods['paragraphs'] >= 3 and not methods['markdown'], methods
    screenshot = browser.screenshot(tmp_path / 'sub-01-1366x900.png')
    assert screenshot.stat().st_size > 10_000  # a real rendering, not a blank page
    assert _png_size(screenshot) == LAPTOP


def test_methods_are_html_not_markdown(report):
    """The methods text (logs/CITATION.md) is in the page as HTML: paragraphs, a References
    heading and list, and no Markdown source such as ``###``."""
    page = report.read_text()
    methods = page.split('<h2>Methods</h2>', 1)[1]
    assert '<p>Results included in this manuscript' in methods
    assert '<h3>References</h3>' in methods and '<li>' in methods
    assert '###' not in page
    citation = (report.parent / 'logs' / 'CITATION.md').read_text()
    assert 'FLAIR image to T1w space' in citation and 'FLAIR image to T1w space' in methods


def test_a_broken_figure_is_caught(report, browser, tmp_path):
    """The checks above do fail: a page with a missing figure logs an error and has an
    image of natural width 0."""
    page = tmp_path / 'broken.html'
    page.write_text(
        report.read_text().replace('<h2>Images</h2>', '<h2>Images</h2><img src="missing.png">')
    )
    shutil.copytree(report.parent / 'sub-01', tmp_path / 'sub-01')
    browser.open_page(page.as_uri(), *LAPTOP)
    widths = browser.evaluate(
        'Promise.all(Array.from(document.images, (img) => img.decode().catch(() => null)))'
        '.then(() => Array.from(document.images, (img) => img.naturalWidth))'
    )
    assert 0 in widths and any(width > 0 for width in widths), widths
    assert any('missing.png' in error for error in browser.console_errors()), browser.events
