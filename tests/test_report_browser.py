"""report.html in a real browser (headless Chromium from the system, driven by Selenium; no browser download):
every image loads, no console errors, the screenshot is not blank. Skips, saying why, without a browser."""
from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from convnext_fast.error_report import Predictions, build_report


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[dev])")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver_bin = shutil.which("chromedriver")
    if binary is None or driver_bin is None:
        # In CI the browser is installed by .ci/install-browser: a missing one there is a failure, not a skip.
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)("no system Chromium + chromedriver (Debian: apt-get install chromium chromium-driver; "
                    "CI installs them with .ci/install-browser)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1800", "--allow-file-access-from-files"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver_bin), options=opts)


def _report(tmp_path, num_classes):
    """A report with several sizes, more classes than the matrix table holds (heat-map image) and one
    unreadable image (a placeholder, not a broken <img>)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), 4)
    paths = []
    for i in range(len(labels)):
        p = tmp_path / "imgs" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        if i == 5:
            p.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    logits = rng.normal(0, 1.5, (2, len(labels), num_classes)).astype(np.float32)
    logits[:, np.arange(len(labels)), labels] += np.array([[1.0], [2.0]], dtype=np.float32)
    preds = Predictions(classes=[f"class {c} <&>" for c in range(num_classes)], labels=labels, paths=paths,
                        img_sizes=[32, 48], logits=logits, meta={"weights": "w.pt", "data": str(tmp_path)})
    return build_report(preds, tmp_path / "report", worst_n=10)


def _wait_for_images(driver, timeout=30.0):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and not driver.execute_script("return [...document.images].every(i => i.complete)"):
        time.sleep(0.2)
    return driver.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")


def test_report_opens_from_disk_with_every_image_loaded(tmp_path):
    num_classes = 36
    page = _report(tmp_path, num_classes)
    driver = _browser()
    try:
        driver.get(page.as_uri())
        rows = "return [...document.querySelectorAll('#class-table tbody tr')].filter(r => r.offsetParent).length"
        assert driver.execute_script(rows) == 10  # the worst 10 first
        driver.find_element("id", "toggle-classes").click()  # the page's own paging
        assert driver.execute_script(rows) == num_classes
        box = driver.find_element("id", "class-filter")
        box.send_keys("class 3")
        assert driver.execute_script(rows) == sum("class 3" in f"class {c}" for c in range(num_classes))
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L")
        # everything a reader can open (other galleries, closed details), lazy images loaded now
        driver.execute_script("""
            document.querySelectorAll('.collapsed').forEach(e => e.classList.remove('collapsed'));
            document.querySelectorAll('details').forEach(d => d.open = true);
            document.querySelectorAll('img').forEach(i => i.loading = 'eager');""")
        images = _wait_for_images(driver)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        driver.execute_script("console.error('probe')")  # the log channel works: a real error would show
        assert any("probe" in e["message"] for e in driver.get_log("browser"))
    finally:
        driver.quit()
    assert len(images) > num_classes * 2, images  # per-class thumbnails + confidently wrong + the heat-map
    assert any(src == "confusion_matrix.png" for src, _, _ in images)
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, broken
    assert not errors, errors
    px = np.asarray(shot)
    assert px.std() > 10 and len(np.unique(px)) > 50  # not a blank page
