"""Run the docstring examples of the public modules (every public function has a runnable example)."""

from __future__ import annotations

import doctest
import importlib

import pytest

# Add modules here as they gain public functions with examples.
MODULES = [
    "swpfx.prepare",
    "swpfx.training",
    "swpfx.importance",
    "swpfx.sparsity",
    "swpfx.quantize",
    "swpfx.tracing",
    "swpfx.passes.insert_skeletons",
    "swpfx.passes.fold_skeletons",
    "swpfx.passes.analyze_channels",
    "swpfx.passes.remove_channels",
    "swpfx.passes.count_costs",
    "swpfx.passes.measure_channel_similarity",
    "swpfx.passes.stripe_geometry",
    "swpfx.passes.modes",
    "swpfx.passes.lower_stripe_convs",
    "swpfx.runtime_model",
    "swpfx.timing",
    "swpfx.progress",
    "swpfx.persist",
    "swpfx.persist.planning",
    "swpfx.persist.loading",
    "swpfx.convert",
    "swpfx.budget",
    "swpfx.synthetic",
    "swpfx.masks",
    "swpfx.cost",
    "swpfx.export",
    "swpfx.central_filter",
    "swpfx.data",
    "swpfx.demo",
    "swpfx.cli",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module_name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {module_name} failed"
