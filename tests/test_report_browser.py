"""The HTML report in a real headless browser (Debian's chromium): it renders, every image loads, no errors.

The report itself has no scripts. To see inside the browser, a copy gets a probe script as the first thing in
<head>: it records script errors, console.error calls and failed resource loads (the capturing `error`
listener on window sees those of <img>), and after the load event writes the number of images, the number
not decoded (`complete && naturalWidth > 0` fails), and the errors onto <body>; `--dump-dom` prints that DOM.
A deliberately broken copy checks that the probe does see problems.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import fill_grid_study

from sslab.report.html import write_report
from sslab.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
PROBE = """<script>
window.probeErrors = [];
window.addEventListener('error', e => {
  probeErrors.push(e.message || 'failed to load ' + (e.target.src || e.target.href));
}, true);
const consoleError = console.error;
console.error = (...args) => { probeErrors.push(args.join(' ')); consoleError(...args); };
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.dataset.errors = JSON.stringify(probeErrors);
});
</script>"""
BROKEN = "<img src='missing.png' alt='missing'><script>console.error('boom'); notDefined();</script>"


def chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def probe(tmp_path: Path, report: Path, extra: str = "") -> tuple[dict[str, str], list[str]]:
    page = tmp_path / f"probe{len(extra)}.html"
    text = report.read_text().replace("<head>", "<head>" + PROBE, 1).replace("</body>", extra + "</body>")
    page.write_text(text)
    done = chromium(tmp_path, page, "--dump-dom")
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body is not None, done.stdout[:500]
    attributes = {k: html.unescape(v) for k, v in re.findall(r'data-(\w+)="([^"]*)"', body.group(1))}
    return attributes, console_lines(done.stderr)


def test_report_opens_in_chromium_without_errors(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    fill_grid_study(store)
    report = write_report(store, "head", out=tmp_path / "report.html")
    expected_images = report.read_text().count("<img ")

    seen, console = probe(tmp_path, report)
    assert int(seen["images"]) == expected_images == 3  # heatmap, curve, learning curves
    assert seen["broken"] == "0" and json.loads(seen["errors"]) == [] and console == []

    seen, console = probe(tmp_path, report, BROKEN)  # the probe does notice a broken page
    assert seen["broken"] == "1" and len(json.loads(seen["errors"])) == 3 and console

    shot = tmp_path / "shot.png"
    done = chromium(tmp_path, report, f"--screenshot={shot}", "--window-size=1280,1600")
    assert console_lines(done.stderr) == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1280)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text, tables and a figure, not a blank page
