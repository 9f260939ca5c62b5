"""swpfx: stripe-wise pruning of CNNs as Torch FX graph passes.

    prepared = swpfx.prepare(model, example_inputs=(x,))
    loss = task_loss + swpfx.skeleton_penalty(prepared, alpha=1e-5)
    deployed = swpfx.convert(prepared, threshold=0.05)
"""

from swpfx.prepare import PrepareConfig, is_prepared, prepare, skeletons, skipped_convs
from swpfx.tracing import TracingError
from swpfx.training import param_groups, regularize_skeletons_, skeleton_penalty

__all__ = [
    "PrepareConfig",
    "TracingError",
    "is_prepared",
    "param_groups",
    "prepare",
    "regularize_skeletons_",
    "skeleton_penalty",
    "skeletons",
    "skipped_convs",
]
__version__ = "0.1.0"
