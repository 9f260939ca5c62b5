"""swpfx: stripe-wise pruning of CNNs as Torch FX graph passes.

    prepared = swpfx.prepare(model, example_inputs=(x,))
    loss = task_loss + swpfx.skeleton_penalty(prepared, alpha=1e-5)
    deployed = swpfx.convert(prepared, threshold=0.05)
    print(swpfx.cost(deployed, (x,)))
    swpfx.export_onnx(deployed, (x,), "model.onnx")
"""

from swpfx.budget_pruner import BudgetPruner
from swpfx.central_filter import central_filter, l1_filter_prune
from swpfx.convert import convert, cut_table
from swpfx.cost import CostReport, compare, cost
from swpfx.importance import stripe_importance
from swpfx.export import ExportError, ExportResult, ExportVerificationError, export_onnx, ort_session, run_onnx, verify_onnx
from swpfx.persist import load, save
from swpfx.prepare import PrepareConfig, is_prepared, prepare, skeletons, skipped_convs
from swpfx.tracing import TracingError
from swpfx.sparsity import SparsityReport, sparsity
from swpfx.timing import latencies, latency
from swpfx.training import param_groups, regularize_skeletons_, scheduled_sparsity, skeleton_penalty

__all__ = [
    "BudgetPruner",
    "CostReport",
    "ExportError",
    "ExportResult",
    "ExportVerificationError",
    "PrepareConfig",
    "SparsityReport",
    "TracingError",
    "central_filter",
    "compare",
    "convert",
    "cost",
    "cut_table",
    "latencies",
    "latency",
    "export_onnx",
    "is_prepared",
    "l1_filter_prune",
    "load",
    "param_groups",
    "ort_session",
    "prepare",
    "regularize_skeletons_",
    "run_onnx",
    "save",
    "scheduled_sparsity",
    "skeleton_penalty",
    "skeletons",
    "skipped_convs",
    "sparsity",
    "stripe_importance",
    "verify_onnx",
]
__version__ = "0.1.0"
