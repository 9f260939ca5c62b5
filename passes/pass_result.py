"""What every pass returns: the idea of ``torch.fx.passes.infra.pass_base.PassResult``, plus its analysis.

Each pass takes a GraphModule and returns a subclass of :class:`PassResult`
carrying the (changed in place) ``graph_module``, whether it ``modified`` the
graph, and the pass's own findings as typed fields.

Example:
    >>> import torch
    >>> from torch import fx
    >>> r = PassResult(fx.symbolic_trace(torch.nn.ReLU()), modified=False)
    >>> r.modified, isinstance(r.graph_module, fx.GraphModule)
    (False, True)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
