"""Imports run one way: swpfx/ uses passes/, never the reverse (the passes folder imports without swpfx)."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, json, pkgutil, sys
root, site_dirs = sys.argv[1], json.loads(sys.argv[2])
stdlib = [p for p in sys.path if p and p != root]  # with -S and -c: the standard library only
sys.path[:] = [root, *stdlib, *site_dirs]         # + the repository root and the venv's site-packages
import passes
names = sorted(m.name for m in pkgutil.iter_modules(passes.__path__, "passes."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "swpfx": sorted(m for m in sys.modules if m == "swpfx" or m.startswith("swpfx."))}))
"""


def test_passes_never_import_swpfx():
    site_dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    # -S: no site hooks (an editable install's import finder would otherwise be active); -E: no PYTHON* variables.
    result = subprocess.run([sys.executable, "-S", "-E", "-c", PROBE, str(ROOT), json.dumps(site_dirs)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = sorted(f"passes.{p.stem}" for p in (ROOT / "passes").glob("*.py") if p.stem != "__init__")
    assert report["modules"] == expected
    assert "passes.lower_stripe_convs" in report["modules"] and "passes.stripe_geometry" in report["modules"]
    assert report["swpfx"] == [], f"modules of passes/ imported {report['swpfx']}"
