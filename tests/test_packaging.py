"""The wheel: only the package (with py.typed and the console script), no tests, docs, results or
data; and it runs from its own files. Built offline with the installed setuptools (a few seconds)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_the_package_only_and_runs(tmp_path):
    src = tmp_path / "src_tree"  # build from a copy: nothing is written into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=120)
    wheel = next((tmp_path / "dist").glob("equimodal-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not (n.startswith("equimodal/") or ".dist-info/" in n)]
    assert not outside, f"the wheel holds files outside the package: {outside}"
    assert "equimodal/py.typed" in names and "equimodal/cli.py" in names and "equimodal/methods/ogm_ge.py" in names
    data_like = [n for n in names if n.rsplit(".", 1)[-1] in ("pt", "npz", "wav", "jpg", "png", "csv", "html")]
    assert not data_like, f"data or results in the wheel: {data_like}"
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "equimodal = equimodal.cli:console" in entry
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", "import equimodal, sys; print(equimodal.__file__); "
                          "from equimodal.cli import main; sys.exit(main(['methods']))"],
                         check=True, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120).stdout
    assert out.splitlines()[0].startswith(str(site)) and "ogm-ge" in out
