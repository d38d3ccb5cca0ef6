"""``seediff report`` in a real headless Chromium (Debian's chromium and chromium-driver, installed by the test
set-up): the page loads with no console error, fetches nothing from the network, lists every class (a CJK and an
accented name among them), shows its plots and thumbnails, and its screenshot is not blank. Class names in any
script are drawn with glyphs, not boxes, in ``preview`` and the report's plots."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

import seediff
from seediff.pipeline import fonts
from seediff.pipeline.cli import main
from seediff.pipeline.review import LEGEND_ROW
from tests.e2e_support import reference_run

CLASSES = ("cat", "Café crème", "猫")
SETTINGS = {"model": "tiny", "resolution": 64, "steps": 2, "batch_size": 3, "samples_per_shard": 4,
            "mask": {"pamr_iterations": 5}}


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    """A small output (3 classes x 3 samples, 3 shards) written without Ray."""
    directory = tmp_path_factory.mktemp("report")
    manifest = directory / "classes.csv"
    manifest.write_text("class_name,num_samples\n" + "".join(f"{name},3\n" for name in CLASSES), encoding="utf-8")
    reference_run(manifest, str(directory / "out"), SETTINGS)
    return directory / "out"


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-extensions", "--window-size=1200,1600"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Debian's chromium-driver matches the browser's version; naming it keeps Selenium from fetching one.
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)


def test_report_page_in_headless_chromium(output, tmp_path, capsys):
    page = tmp_path / "report.html"
    assert main(["report", str(output), "-o", str(page)]) == 0
    assert f"wrote {page} (3 classes, 9 samples" in capsys.readouterr().out
    driver = chromium()
    try:
        driver.get(page.as_uri())
        text = driver.find_element(By.TAG_NAME, "body").text
        images = driver.execute_script(
            "return Array.from(document.images, i => [i.src.slice(0, 22), i.complete && i.naturalWidth > 0])")
        requests = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")
        console = driver.get_log("browser")
        screenshot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L"), dtype=np.float32)
    finally:
        driver.quit()
    for name in CLASSES:
        assert name in text, f"{name!r} missing from the page"
    assert "Run settings" in text and "pamr_iterations" in text
    assert not [entry for entry in console if entry["level"] in ("SEVERE", "WARNING")], console
    assert requests == []  # self-contained: nothing but the file itself and inline data
    # 4 plots + for each class its weakest and strongest samples, every one inlined and decoded
    assert len(images) == 4 + 3 * 3 and all(src.startswith("data:image/") and ok for src, ok in images), images
    assert screenshot.var() > 100, "the screenshot is blank"


def test_report_from_the_python_api_counts_every_sample(output, tmp_path):
    covered = seediff.report(output, tmp_path / "report.html")
    assert (covered["classes"], covered["samples"], covered["failures"]) == (3, 9, 0)


@pytest.mark.parametrize("name,other", [("猫", "犬"), ("Café", "Cafe")])
def test_class_names_in_any_script_are_drawn_with_glyphs(name, other):
    """A missing glyph draws as the same box for every character, so two names that differ only in a CJK or
    accented character would look identical; with a covering font they do not."""
    assert all(fonts.font_for(char) is not None for char in name), f"no installed font covers {name!r}"

    def drawn(text: str) -> np.ndarray:
        tile = Image.new("RGB", (96, 32))
        fonts.draw_label(ImageDraw.Draw(tile), (2, 2), text, 20)
        return np.asarray(tile.convert("L"))

    assert drawn(name).any() and not np.array_equal(drawn(name), drawn(other))


def test_preview_labels_cjk_names(output, tmp_path):
    width, height = seediff.preview(output, tmp_path / "grid.png", class_name="猫", cell=192)
    sheet = Image.open(tmp_path / "grid.png").convert("L")
    assert (width, height) == (384, 384 + LEGEND_ROW)  # 2 x 2 cells, one legend line (the class, ignore)
    # the first cell's label band holds exactly what the covering font draws for the name (16 px at this size)
    w, h = fonts.label_size("猫", 16)
    expected = Image.new("L", (w + 4, h + 4))
    fonts.draw_label(ImageDraw.Draw(expected), (2, 2), "猫", 16, fill=255)
    band = np.asarray(sheet.crop((0, 0, w + 4, h + 4)), dtype=np.int16)
    assert np.abs(band - np.asarray(expected, dtype=np.int16)).max() <= 1 and band.max() > 200


def test_quality_numbers_come_from_the_parquet_columns_when_present():
    """Outputs whose parquets hold per-class quality columns (one row per sample, lists in class order) are read
    without opening a tar; every class of a row counts, named by the run's class table."""
    import pyarrow as pa

    from seediff.pipeline.report import _has_quality_columns, _quality_from_parquets
    from seediff.schemas.records import SUCCESS

    rows = pa.table({
        "key": ["000000000000", "000000000001"], "shard": [0, 0], "class_id": [1, 2], "class_name": ["cat", "犬"],
        "status": [SUCCESS, SUCCESS], "class_ids": [[1, 2], [2]], "class_pixel_fractions": [[0.25, 0.5], [0.75]],
        "class_scores": [[0.5, 0.25], [0.125]], "class_seeds": [[3, 1], [2]], "ignore_fraction": [0.0625, 0.0],
    })
    assert _has_quality_columns([rows])
    quality = _quality_from_parquets([rows], {1: "cat", 2: "犬"})
    got = [(q.key, q.class_name, q.area, q.seeds, q.ignore, q.confidence) for q in quality]
    assert got == [
        ("000000000000", "cat", 0.25, 3, 0.0625, 0.5),
        ("000000000000", "犬", 0.5, 1, 0.0625, 0.25),
        ("000000000001", "犬", 0.75, 2, 0.0, 0.125),
    ]
