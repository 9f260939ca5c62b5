"""Training that aims at the deployed cut: :class:`BudgetPruner` ramps ``convert``'s budget cut in while the net trains.

The gradual rule (:func:`swpfx.regularize_skeletons_`) zeroes a *fraction of
stripes*; a latency budget at conversion then cuts far more on top (whole
filters, to reach the latency), without retraining, and small BatchNorm nets
collapse (benchmarks/RESULTS.md, issue 12). :class:`BudgetPruner` instead asks
the budget itself — :func:`swpfx.budget.masks_for_latency_target` or
:func:`~swpfx.budget.masks_for_flops_target`, priced by
:class:`swpfx.estimate.ConversionEstimate` — for the cut at a target that falls
linearly from 1 to ``latency_target`` (or ``flops_target``) over the first
``ramp`` of training (default: the first third, leaving two thirds to train
with the final cut), recomputed ``updates`` times from the current importance,
and keeps the stripes outside the latest cut at zero after every optimizer step.
The network trains with the very cut it will be deployed with, so at the end
``swpfx.convert(prepared, threshold=0.0)`` meets the target and removes only
what training has already zeroed.

Between updates the cut is fixed; at an update, stripes zeroed earlier rank
first (their importance is about 0) but are not forced: if the new cut does
not need them (they sit in a conv that stays dense, or in a filter the graph
keeps) they are given back and regrow. With ``nested=True`` each cut keeps the
last one's zeros instead. What matters at deep cuts is the ramp's length, not
nesting: at 0.27 of the dense latency (predicted) the BN residual net reached
77-78 % with a ramp over 2/3 of training and 88-91 % over 1/3 or 1/5, nested or
not (``benchmarks/pruner_schedule.py``, benchmarks/RESULTS.md).

Example:
    >>> import torch, swpfx
    >>> from swpfx.data import residual_bn_cnn
    >>> from swpfx.runtime_model import RuntimeModel
    >>> x = torch.randn(8, 1, 28, 28)
    >>> prepared = swpfx.prepare(residual_bn_cnn(), (x,))
    >>> pruner = BudgetPruner(prepared, latency_target=0.6, runtime_model=RuntimeModel(), updates=2)
    >>> for step in range(4):                    # your training loop: forward, backward, optimizer.step(), then
    ...     zero = pruner.step(progress=(step + 1) / 4)
    >>> pruner.report["latency_ratio"] <= 0.6
    True
    >>> deployed = swpfx.convert(prepared, threshold=0.0, runtime_model=RuntimeModel())   # nothing more is cut
"""

from __future__ import annotations

import math

import torch
from torch import fx

from swpfx.budget import check_fraction, masks_for_flops_target, masks_for_latency_target
from swpfx.importance import DEFAULT_SCOPE
from swpfx.pipeline import convert_with_masks
from swpfx.prepare import _require_prepared, skeletons

DEFAULT_UPDATES = 10
DEFAULT_RAMP = 1 / 3  # of training; the last two thirds train with the final cut


class BudgetPruner:
    """Keep ``prepared``'s skeletons at the budget's cut for a target ramped from 1 down to the goal.

    Give exactly one of ``latency_target`` (predicted ONNX Runtime latency over
    the dense model's, at ``example_inputs``' batch size, by ``runtime_model`` —
    default: this machine's calibration, measured on first use; with
    ``lowering="fused"``, the fused kernel's PyTorch latency) or
    ``flops_target`` (converted FLOPs over dense, cut at ``granularity``). The
    remaining arguments are ``convert``'s. Call :meth:`step` after every
    ``optimizer.step()`` with ``progress = step / total_steps``; it recomputes
    the cut at ``updates`` evenly spaced points of the ramp (the first one at
    ``ramp / updates``) and zeroes every stripe outside it, value and gradient;
    with ``nested`` each cut keeps the last one's zeros.
    ``report`` is the latest cut's report (as in ``deployed.meta["swpfx"]["cut"]``).
    The goal's cut is computed once at construction, so an unreachable target
    raises there (naming the closest reachable value), not in the middle of training.

    ``measure=N`` (with ``latency_target``) aims training at the latency that will
    be *measured*: the goal's cut is converted and timed against the dense model
    as ``convert(measure=N)`` does (up to ``N`` conversions, each re-aimed by the
    last one's miss), and the ramp falls to the predicted target whose cut
    measured within ``latency_target`` (``target``). This is done at construction
    and again at the last update, on the trained weights (whose cut differs from
    the initial one), so the network trains on with the cut that measures within
    the goal; ``measured`` holds the latest rounds, ``aims`` every aim. A runtime
    model fitted on isolated convs misjudges some graphs by 10-40 %
    (``benchmarks/RESULTS.md``); without this, the network trains towards a cut
    that later measures slower than the goal. Convert the trained model with
    ``latency_target=pruner.target`` (or ``threshold=0.0``).
    """

    def __init__(self, prepared: fx.GraphModule, *, latency_target: float | None = None,
                 flops_target: float | None = None, example_inputs=None, ramp: float = DEFAULT_RAMP,
                 updates: int = DEFAULT_UPDATES, runtime_model=None, channel_multiple: int | None = None,
                 lowering: str = "auto", granularity: str = "stripe", scope: str = DEFAULT_SCOPE, measure: int = 0,
                 nested: bool = False):
        from swpfx.convert import (_check_args, default_channel_multiple, default_runtime_model_for,
                                   example_inputs_for, probe_and_batch)

        _require_prepared(prepared, "BudgetPruner")
        if (latency_target is None) == (flops_target is None):
            raise ValueError("swpfx.BudgetPruner: give exactly one of latency_target and flops_target")
        self.kind = "latency" if latency_target is not None else "flops"
        target = latency_target if latency_target is not None else flops_target
        check_fraction(f"{self.kind}_target", target, "BudgetPruner")
        check_fraction("ramp", ramp, "BudgetPruner")
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 1:
            raise ValueError(f"swpfx.BudgetPruner: updates must be a positive int, got {updates!r}")
        if isinstance(measure, bool) or not isinstance(measure, int) or measure < 0:
            raise ValueError(f"swpfx.BudgetPruner: measure must be a number of rounds >= 0, got {measure!r}")
        if measure and self.kind != "latency":
            raise ValueError("swpfx.BudgetPruner: measure checks a latency_target; pass one")
        channel_multiple = default_channel_multiple(lowering) if channel_multiple is None else channel_multiple
        _check_args(None, flops_target, latency_target, lowering, channel_multiple, granularity)
        inputs = example_inputs_for(prepared, example_inputs, caller="BudgetPruner")
        self.prepared, self.target, self.ramp, self.updates = prepared, float(target), float(ramp), updates
        self.nested = nested
        self.probe, self.batch = probe_and_batch(inputs)
        self.lowering, self.channel_multiple, self.granularity, self.scope = lowering, channel_multiple, granularity, scope
        if runtime_model is None:
            runtime_model = default_runtime_model_for(lowering, calibrate_if_missing=self.kind == "latency")
        self.runtime_model = runtime_model
        self.masks: dict[str, torch.Tensor] | None = None
        self.report: dict = {}
        self.done_updates = 0
        self.goal, self.measure, self.inputs = self.target, measure, inputs
        self.measured: list[dict] = []
        self.aims: list[dict] = []  # per aim: the update it was made at (0: construction), its target and rounds
        self.cut(self.target)  # an unreachable target fails here, with the closest reachable value, not mid-training
        if measure:
            self.target = self.aim_by_measuring(inputs, measure)

    def aim_by_measuring(self, inputs: tuple, rounds: int, update: int = 0) -> float:
        """The predicted target whose cut (on the current weights) measured within the goal, found as
        ``convert(measure=rounds)`` finds it, starting from the current ``target``; fills ``measured`` with
        every round and appends the aim to ``aims``."""
        from swpfx.convert import build_dense, meet_measured_latency

        choose_form = self.runtime_model.choose_form

        def build(target: float):
            masks, report = self.cut(target)
            return (*convert_with_masks(self.prepared, masks, self.lowering, self.probe, self.channel_multiple,
                                        choose_form), report)

        dense = build_dense(self.prepared, self.lowering, self.probe, self.channel_multiple, choose_form)
        _, _, cut = meet_measured_latency(build, self.goal, dense, inputs, self.lowering, rounds,
                                          caller="BudgetPruner", first_target=self.target)
        self.measured = cut["measured"]
        self.aims.append({"update": update, "target": cut["latency_target"], "rounds": self.measured})
        return cut["latency_target"]

    def scheduled_target(self, update: int) -> float:
        """The target of the ``update``-th cut (1 … ``updates``): linear from 1 to the goal.

        >>> p = BudgetPruner.__new__(BudgetPruner); p.target, p.updates = 0.4, 4
        >>> [p.scheduled_target(k) for k in (1, 2, 4)]
        [0.85, 0.7, 0.4]
        """
        return self.target if update >= self.updates else 1.0 - (1.0 - self.target) * update / self.updates

    def due_updates(self, progress: float) -> int:
        """How many cuts should have been made by ``progress`` (the k-th is due at ``k · ramp / updates``)."""
        return min(self.updates, math.floor(max(0.0, progress) / self.ramp * self.updates + 1e-9))

    def step(self, progress: float) -> int:
        """Recompute the cut if one is due at ``progress`` (0 … 1), zero every stripe outside it; returns the zeros."""
        if not isinstance(progress, (int, float)) or math.isnan(progress) or not 0 <= progress <= 1:
            raise ValueError(f"swpfx.BudgetPruner.step: progress must be a fraction in [0, 1], got {progress!r}")
        due = self.due_updates(progress)
        if due > self.done_updates:
            if due == self.updates and self.measure:  # the last cut: aimed again, on the trained weights
                self.target = self.aim_by_measuring(self.inputs, self.measure, update=due)
            self.masks, self.report = self.cut(self.scheduled_target(due))
            self.done_updates = due
        return self.apply_()

    def cut(self, target: float) -> tuple[dict[str, torch.Tensor], dict]:
        """The budget's keep masks and report for ``target`` on the current weights, within the last cut.

        With ``nested``, the last cut's zeros are applied first (the optimizer
        moves them off zero between steps) and every exact zero stays pruned;
        without, they only rank first (their importance is about 0) and may regrow.
        """
        was_training = self.prepared.training
        if self.nested:
            self.apply_()
        try:
            if self.kind == "latency":
                return masks_for_latency_target(self.prepared, target, self.lowering, self.probe, self.runtime_model,
                                                self.channel_multiple, self.scope, batch=self.batch,
                                                sticky_zeros=self.nested)
            return masks_for_flops_target(self.prepared, target, self.lowering, self.probe, self.channel_multiple,
                                          self.granularity, self.scope, runtime_model=self.runtime_model,
                                          sticky_zeros=self.nested)
        finally:
            self.prepared.train(was_training)

    @torch.no_grad()
    def apply_(self) -> int:
        """Zero the skeleton entries (and their gradients) outside the current cut; returns how many are zero."""
        zero = 0
        for name, skel in skeletons(self.prepared).items():
            if self.masks is not None:
                pruned = ~self.masks[name].to(skel.device)
                skel.masked_fill_(pruned, 0.0)
                if skel.grad is not None:
                    skel.grad.masked_fill_(pruned, 0.0)
            zero += int((skel == 0).sum())
        return zero
