"""The HTML reports in a real browser (headless Chromium, Debian's `chromium`): each kind of report loads with no
console error, every image decodes, its tables are there and fit a 1,300-pixel-wide page (free text wraps, left
aligned), and a screenshot is kept under the test's tmp dir.
`.ci/run` installs Chromium when it is absent; elsewhere the test is skipped without it."""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import tiny_overrides

import afinar
from afinar.core.config import load_config
from afinar.experiments.compare import CompareArgs, compare
from afinar.experiments.search import search

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI must run the browser test: install Debian's chromium (.ci/run does)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.setAttribute("data-check", JSON.stringify({
    images: images.length, broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).length,
    tables: document.querySelectorAll("table").length,
    overflowing: [...document.querySelectorAll("table")].filter(
      t => t.getBoundingClientRect().right > document.documentElement.clientWidth).length,
    text_cells: document.querySelectorAll("td.text").length,
    text_not_left: [...document.querySelectorAll("td.text")].filter(
      c => getComputedStyle(c).textAlign !== "left").length}));
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120)


def open_in_browser(report, tmp_path, kind: str) -> dict:
    """Load a copy of `report` with a probe that records images and tables; screenshot the original."""
    page = report.read_text(encoding="utf-8")
    probe = tmp_path / f"{kind}-probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    loaded = chromium("--dump-dom", "--window-size=1300,1800", probe.as_uri())
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    errors = [line for line in loaded.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not errors, errors
    found = re.search(r'data-check="([^"]*)"', loaded.stdout)
    assert found, "the page did not finish loading"
    shot = tmp_path / f"{kind}.png"
    screenshot = chromium(f"--screenshot={shot}", "--window-size=1200,1800", report.as_uri())
    assert screenshot.returncode == 0 and shot.stat().st_size > 10_000, screenshot.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"'))


def test_every_report_kind_renders_in_a_real_browser(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    run = afinar.train(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path / "runs",
                                                            **{"train.max_steps": 8, "train.eval_every": 2})))
    comparison = compare(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path / "runs",
                                                              **{"train.max_steps": 6, "train.run_name": None})),
                         "knn_retrieval,full", tmp_path / "compare", CompareArgs(encoder=str(tiny_bert), isolate=False))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3}}))
    searched = search(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path / "search", **{
        "train.max_steps": 6, "train.eval_every": 3, "train.run_name": None})), trials=2, space=space, pruner="none")
    reports = (("run", run.run_dir / "report.html", 3), ("compare", comparison.path / "report.html", 2),
               ("search", searched.path / "report.html", 1))
    for kind, report, images in reports:
        check = open_in_browser(report, tmp_path, kind)
        assert check["broken"] == 0 and check["images"] >= images and check["tables"] >= 1, (kind, check)
        assert check["overflowing"] == 0 and check["text_not_left"] == 0, (kind, check)  # on a 1,300-pixel page
    assert open_in_browser(run.run_dir / "report.html", tmp_path, "run")["text_cells"] >= 8  # suspects' tweets
