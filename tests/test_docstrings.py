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
    "swpfx.passes.fuse_stripe_convs",
    "swpfx.kernels.fused_conv",
    "swpfx.kernels.max_pool",
    "swpfx.kernels.buffers",
    "swpfx.passes.plan_kernel_buffers",
    "swpfx.passes.replace_max_pools",
    "swpfx.runtime_model",
    "swpfx.fused_runtime_model",
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
    "swpfx.plots",
    "swpfx.estimate",
    "swpfx.passes.form_work",
    "swpfx.passes.fold_batchnorm_into_sums",
    "swpfx.passes.pass_result",
    "swpfx.passes.channel_rules",
    "swpfx.cli",
    "swpfx.pipeline",
    "swpfx.budget_pruner",
    "swpfx.peers",
    "swpfx.passes.graph_utils",
]
# Modules without examples of their own, and why.
EXEMPT = {
    "swpfx.__main__": "the `python -m swpfx` entry point (tests/test_cli.py runs it)",
    "swpfx.kernels": "the fused kernel needs a compiler; tests/test_stripe_kernel.py covers it or says why not",
    "swpfx.kernels.stripe_conv": "as swpfx.kernels",
    "swpfx.persist.allowlist": "internal to swpfx.persist (whose examples run), covered by tests/test_persist.py",
    "swpfx.persist.codec": "internal to swpfx.persist, covered by tests/test_persist.py",
    "swpfx.persist.container": "internal to swpfx.persist, covered by tests/test_persist.py",
}


def test_every_module_is_listed_or_exempt_with_a_reason():
    import pkgutil

    import swpfx
    import swpfx.passes

    modules = {m.name for m in pkgutil.walk_packages(swpfx.__path__, "swpfx.")}
    modules |= {m.name for m in pkgutil.walk_packages(swpfx.passes.__path__, "swpfx.passes.")}
    assert modules - set(MODULES) - set(EXEMPT) == set()


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module_name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {module_name} failed"
