"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ("prepare", "param_groups", "regularize_skeletons_", "sparsity", "convert", "cost", "compare", "export_onnx")


def readme_example() -> str:
    """The first ```python block that calls swpfx.prepare, from README.md."""
    for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        if "swpfx.prepare(" in block:
            return block
    raise AssertionError("README.md has no Python example calling swpfx.prepare")


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    import swpfx

    missing = [name for name in PUBLIC if not callable(getattr(swpfx, name, None))]
    assert not missing, f"swpfx/__init__.py does not export {missing} (the README uses them as swpfx.<name>)"
    code = readme_example().replace("/tmp/", f"{tmp_path}/")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "def forward" in out  # print(deployed.code)
    assert "reduction" in out  # the compare table
    assert (tmp_path / "pruned.onnx").stat().st_size > 0


def test_readme_latency_budget_example_runs(monkeypatch, capsys):
    import swpfx.runtime_model as rm

    monkeypatch.setattr(rm, "default_runtime_model", lambda *a, **k: rm.RuntimeModel())  # no calibration in tests
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
              if "BudgetPruner(" in b]
    assert blocks, "README.md has no BudgetPruner example"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    ratio = float(re.search(r"predicted latency: ([\d.]+) of dense", out).group(1))
    assert ratio <= 0.5 and "predicted ms" in out
