"""``OneDnnMaxPool2d``: ``nn.MaxPool2d`` run by oneDNN in PyTorch eager (``convert(lowering="fused")``).

PyTorch's own CPU max pool on NCHW float tensors is slow: in a fused ResNet-18
(batch 1, 224², 2 threads) the stem's 3×3/2 pool over 64×112² took 3.3-3.5 ms,
more than any conv, where ``torch.mkldnn_max_pool2d`` -- the same pool in
oneDNN, which ships inside PyTorch's CPU builds -- takes 0.2 ms including the
conversions to and from its layout (``benchmarks/fused_end_to_end.py``,
RESULTS.md). A max is exact, so the two agree bit for bit.

The module is an ``nn.MaxPool2d`` (same constructor, same ``extra_repr``, same
cost formula and ONNX export); only eager float32 CPU calls that need no
gradient and have dilation 1 go to oneDNN, everything else -- autograd,
``torch.export`` / ONNX export, ``return_indices=True``, a PyTorch without
oneDNN -- runs ``nn.MaxPool2d.forward``.

Example:
    >>> import torch
    >>> from swpfx.kernels.max_pool import OneDnnMaxPool2d
    >>> pool = OneDnnMaxPool2d(3, stride=2, padding=1)
    >>> x = torch.randn(1, 8, 15, 15)
    >>> torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 3, 2, 1))
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from swpfx.kernels import is_traced

__all__ = ["OneDnnMaxPool2d", "onednn_applies"]


def onednn_applies(pool: nn.MaxPool2d, x: torch.Tensor) -> bool:
    """Whether ``pool(x)`` can go to oneDNN: an eager float32 4-D CPU call needing no gradient, dilation 1,
    no indices, on a PyTorch built with oneDNN."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and not pool.return_indices
            and _pair(pool.dilation) == (1, 1) and torch.backends.mkldnn.is_available()
            and not (torch.is_grad_enabled() and x.requires_grad) and not is_traced())


class OneDnnMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose eager inference calls run in oneDNN (see the module docstring)."""

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> OneDnnMaxPool2d:
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not onednn_applies(self, x):
            return super().forward(x)
        pooled = torch.mkldnn_max_pool2d(x.contiguous().to_mkldnn(), _pair(self.kernel_size), _pair(self.stride),
                                         _pair(self.padding), [1, 1], self.ceil_mode)
        return pooled.to_dense()
