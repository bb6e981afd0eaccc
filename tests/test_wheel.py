"""A non-editable wheel carries conf/ inside the package and runs from anywhere."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # builds and installs a wheel, runs it in subprocesses


def test_wheel_install_finds_its_config(tmp_path):
    # build from a copy of the tracked files, so nothing stale in the checkout can slip into the wheel
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("kdrun-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "kdrun/conf/distill.yaml" in names and "kdrun/conf/teacher/mlp1200.yaml" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "KDRUN_WORKDIR": str(tmp_path / "work")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def kdrun(*args):
        return subprocess.run([sys.executable, "-m", "kdrun", *args], env=env, cwd=elsewhere,
                              capture_output=True, text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import kdrun.cli as c; print(c.__file__); print(c.conf_dir())"],
                           env=env, cwd=elsewhere, capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(site / "kdrun" / "cli.py"), str(site / "kdrun" / "conf")]
    cfg = kdrun("distill", "--cfg", "job", "T=7")
    assert cfg.returncode == 0 and "T: 7" in cfg.stdout and "hidden:" in cfg.stdout
    bad = kdrun("distill", "alpha=2")
    assert (bad.returncode, bad.stderr.strip()) == (2, "kdrun: error: alpha must be in [0, 1], got 2")
    assert not (tmp_path / "work").exists()
