"""03_pair_weights in a real browser: JupyterLab + Debian's headless chromium driven by Playwright.

First trains a short run of the embedded default where 02_train would put it, so 03 opens on a
trained model; then runs every cell, drags the beta slider and the snapshot slider and checks
that the figures the kernel sends back changed. Skipped with a reason where chromium or
Playwright is missing, but failed under CI=... (CI installs chromium). Set
MSL_KIT_SCREENSHOTS=docs to refresh docs/pair_weights.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from jupyter_lab import jupyter_lab
from helpers import REPO

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KERNEL_IDLE = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const session = panel && panel.sessionContext && panel.sessionContext.session;
  const kernel = session && session.kernel;
  return !!kernel && kernel.status === 'idle' && kernel.connectionStatus === 'connected';
}"""
ALL_RUN = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const done = cells.length > 0 && cells.every(c => c.model.executionCount !== null);
  return done && panel.sessionContext.session.kernel.status === 'idle';
}"""
ERRORS = """() => window.jupyterapp.shell.currentWidget.content.widgets
  .filter(c => c.model.type === 'code')
  .flatMap(c => c.model.outputs.toJSON().filter(o => o.output_type === 'error')
    .map(o => o.ename + ': ' + o.evalue))"""
SRC_CHANGED = (
    "([selector, old]) => { const el = document.querySelector(selector); "
    "return el && el.src !== old; }"
)


def _browser() -> str:
    """Path of chromium; skip (or fail under CI) with the reason when the browser stack is
    missing."""
    reason = None
    debian = Path("/usr/bin/chromium")
    exe = shutil.which("chromium") or (str(debian) if debian.exists() else None)
    if exe is None:
        reason = (
            "chromium is not installed (Debian: apt-get install chromium); the browser "
            "test needs it"
        )
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = (
                "the playwright Python package is missing (pip install playwright; no "
                "browser download needed)"
            )
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}")
        pytest.skip(reason)
    return exe


OUTPUT_TEXT = """() => window.jupyterapp.shell.currentWidget.content.widgets
  .filter(c => c.model.type === 'code')
  .flatMap(c => c.model.outputs.toJSON().map(o => o.text || '')).join('')"""


def _drag(page, selector: str, dx: float) -> None:
    """Drag a noUiSlider handle (ipywidgets' sliders) by dx pixels."""
    handle = page.locator(selector)
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx, y, steps=8)
    page.mouse.up()


def _trained_run(root: Path) -> Path:
    """A short run of the embedded default where 02_train writes runs (../runs/notebooks)."""
    from msl_kit.train import engine
    from msl_kit.train.config import load_config

    cfg = load_config(None, ["train.iterations=40", "train.eval_every=20", "eval.floors=false"])
    run = root / "runs" / "notebooks" / "omniglot_small-browser"
    engine.train(cfg, run)
    return run


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.browser
@pytest.mark.timeout(420)
def test_sliders_redraw_the_pair_weights_of_a_trained_model_in_jupyterlab(tmp_path):
    exe = _browser()
    from playwright.sync_api import sync_playwright

    root = tmp_path / "lab"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(REPO / "notebooks" / "03_pair_weights.ipynb", root / "notebooks")
    run = _trained_run(root)
    shot = tmp_path / "pair_weights.png"
    with jupyter_lab(root, tmp_path / "state") as lab, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=exe,
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        try:
            page.goto(f"{lab.url}/lab/tree/notebooks/03_pair_weights.ipynb?token={lab.token}")
            page.wait_for_function(KERNEL_IDLE, timeout=120_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            image = page.locator("img.msl-pair-weights")
            image.wait_for(state="visible", timeout=180_000)
            page.locator(".msl-gpw-compare").wait_for(state="visible", timeout=60_000)
            page.wait_for_function(ALL_RUN, timeout=120_000)
            assert page.evaluate(ERRORS) == []
            assert f"trained model from {run.resolve()}" in page.evaluate(OUTPUT_TEXT)
            readout = page.locator(".msl-slider-beta .widget-readout")
            assert readout.inner_text().strip() == "40.00"  # the released preset
            image.scroll_into_view_if_needed()
            before_src, before_png = image.get_attribute("src"), image.screenshot()

            _drag(page, ".msl-slider-beta .noUi-handle", 90)
            page.wait_for_function(
                SRC_CHANGED, arg=["img.msl-pair-weights", before_src], timeout=120_000
            )
            beta = float(readout.inner_text())
            assert beta > 40.0, f"the slider did not move (beta readout {beta})"
            # the preset menu follows
            assert page.locator(".msl-explorer select").input_value() == "custom"
            page.wait_for_timeout(300)  # let the new image decode before capturing it
            after_png = image.screenshot()
            assert after_png != before_png, "the figure did not change after moving beta"
            page.locator(".msl-explorer").screenshot(path=str(shot))

            # the snapshot slider: the same batch at iteration 0 instead of the trained end
            snap = page.locator("img.msl-snapshot-weights")
            snap_src = snap.get_attribute("src")
            _drag(page, ".msl-snapshot-slider .noUi-handle", -600)
            page.wait_for_function(
                SRC_CHANGED, arg=["img.msl-snapshot-weights", snap_src], timeout=120_000
            )
            readout = page.locator(".msl-snapshot-slider .widget-readout").inner_text().strip()
            assert readout == "0", f"the snapshot slider reads {readout}, not iteration 0"
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(
                f"JupyterLab log tail:\n{lab.log.read_text()[-3000:]}\n"
                f"screenshot: {tmp_path / 'failure.png'}"
            )
            raise
        finally:
            context.close()
    assert shot.stat().st_size > 10_000
    target = os.environ.get("MSL_KIT_SCREENSHOTS")
    if target:
        folder = Path(target) if Path(target).is_absolute() else REPO / target
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / "pair_weights.png")
