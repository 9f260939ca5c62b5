"""A non-editable install ships the passes as swpfx.passes and no generic top-level ``passes`` module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
sys.path.append(sys.argv[1])                  # the venv's site-packages (torch etc.), after the install target
import swpfx
swpfx.convert
from swpfx.passes import lower_stripe_convs   # the passes, installed inside swpfx
try:
    import passes
    top_level = passes.__file__
except ImportError:
    top_level = None
print(json.dumps({"swpfx": swpfx.__file__, "passes": lower_stripe_convs.__file__, "top_level_passes": top_level}))
"""


def test_wheel_installs_passes_inside_swpfx(tmp_path):
    source = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info next to pyproject.toml
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("swpfx", "passes"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(wheels), str(source)], check=True, timeout=300)
    (wheel,) = wheels.glob("swpfx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not any(n.startswith("passes/") for n in names), sorted(names)
    expected = {f"swpfx/passes/{p.name}" for p in (ROOT / "passes").glob("*.py")}
    expected |= {f"swpfx/{p.name}" for p in (ROOT / "swpfx").glob("*.py")}
    expected |= {f"swpfx/persist/{p.name}" for p in (ROOT / "swpfx" / "persist").glob("*.py")}
    assert expected <= names, sorted(expected - names)

    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: no site hooks, so the development checkout's editable-install finder is not active.
    result = subprocess.run([sys.executable, "-S", "-c", PROBE, sysconfig.get_paths()["purelib"]], cwd=elsewhere,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["swpfx"]).is_relative_to(target)
    assert Path(report["passes"]) == target / "swpfx" / "passes" / "lower_stripe_convs.py"
    assert report["top_level_passes"] is None
