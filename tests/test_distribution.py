"""The distribution installs one import name, ``seediff``; the source folders become its subpackages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.e2e_support import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # The wheel is what `pip install seediff` unpacks into site-packages.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(REPO)],
        check=True, capture_output=True, timeout=HANG_GUARD_S,
    )
    (built,) = out.glob("seediff-*.whl")
    return built


def test_wheel_installs_only_the_seediff_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (top_level_txt,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = zf.read(top_level_txt).decode().split()
    installed = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert installed == {"seediff"}
    assert declared == ["seediff"]
    for module in ("seediff/pipeline/cli.py", "seediff/workers/actor.py", "seediff/schemas/config.py",
                   "seediff/storage.py", "seediff/__main__.py"):
        assert module in names


def test_public_names_import_from_seediff() -> None:
    code = (
        "import sys, seediff; "
        "heavy = [m for m in ('torch', 'ray', 'diffusers') if m in sys.modules]; "
        "from seediff import segmentation_dataset, wids_dataset, decode_mask, RunConfig, RuntimeOptions, MaskConfig; "
        "print(heavy, RunConfig.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True, timeout=HANG_GUARD_S)
    assert out.stdout.split() == ["[]", "seediff.schemas.config"]
