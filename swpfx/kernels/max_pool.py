"""``CompiledMaxPool2d``: ``nn.MaxPool2d`` run by swpfx's compiled kernel library (``convert(lowering="fused")``).

PyTorch's own CPU max pool on NCHW float tensors is slow: in a fused ResNet-18
(batch 1, 224², 2 threads) the stem's 3×3/2 pool over 64×112² took 3.3-3.5 ms,
more than any conv. oneDNN's pool (``torch.mkldnn_max_pool2d``) needs a copy
into its blocked layout and back: in a graph, where its input is not in cache,
that took 0.6 ms for the stem's pool and 1.9-11 ms for VGG's first 2×2 pool
over 64×224² (page faults on the copies). The compiled pool (``swp_max_pool2d``
in ``stripe_conv.cpp``) reads the NCHW input once, a few planes per work item,
on the same threads as the fused convs, separably (the max down each window's
rows, then across its columns: two contiguous loops the compiler vectorises):
0.11 ms for the stem's pool and 0.34 ms for VGG's first, timed alone on a 2-core
AVX-512 Xeon (``benchmarks/RESULTS.md``). A max is exact, so it agrees with PyTorch bit for
bit, NaN included.

The module is an ``nn.MaxPool2d`` (same constructor, same ``extra_repr``, same
cost formula and ONNX export); only eager float32 CPU calls that need no
gradient and have dilation 1 go to the kernel, everything else -- autograd,
``torch.export`` / ONNX export, ``return_indices=True``, a machine without a
compiler -- runs ``nn.MaxPool2d.forward``.

Example:
    >>> import torch
    >>> from swpfx.kernels.max_pool import CompiledMaxPool2d
    >>> pool = CompiledMaxPool2d(3, stride=2, padding=1)
    >>> x = torch.randn(1, 8, 15, 15)
    >>> torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 3, 2, 1))
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from swpfx.kernels import is_traced, stripe_conv
from swpfx.kernels.buffers import SlotBuffers, writes_fresh_output

__all__ = ["CompiledMaxPool2d", "kernel_applies", "pooled_size"]


def pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of a max pool along one axis (dilation 1), as PyTorch computes it."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:  # the last window must start inside the input
        out -= 1
    return out


def kernel_applies(pool: nn.MaxPool2d, x: torch.Tensor) -> bool:
    """Whether ``pool(x)`` goes to the kernel: an eager float32 4-D CPU call needing no gradient, dilation 1,
    no indices, the kernel built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and not pool.return_indices
            and _pair(pool.dilation) == (1, 1) and not (torch.is_grad_enabled() and x.requires_grad)
            and not is_traced() and stripe_conv.is_available(_pool()))


def _pool() -> str:
    from swpfx.kernels.fused_conv import _pool as fused_pool  # the same threads as the fused convs

    return fused_pool()


class CompiledMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose eager inference calls run the compiled pool (see the module docstring)."""

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> CompiledMaxPool2d:
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)

    def forward(self, x: torch.Tensor, *, buffers: SlotBuffers | None = None, slot: int | None = None
                ) -> torch.Tensor:
        """``nn.MaxPool2d.forward``; a kernel call given ``buffers`` and ``slot`` (``plan_kernel_buffers``) writes
        its output into that slot."""
        if not kernel_applies(self, x):
            return super().forward(x)
        kernel, stride, padding = _pair(self.kernel_size), _pair(self.stride), _pair(self.padding)
        x = x.detach().contiguous()
        n, c, h, w = x.shape
        out_hw = tuple(pooled_size(size, k, s, p, self.ceil_mode)
                       for size, k, s, p in zip((h, w), kernel, stride, padding))
        shape = (n, c, *out_hw)
        out = torch.empty(shape) if buffers is None or writes_fresh_output(self) else buffers.take(slot, shape)
        stripe_conv.max_pool2d_into(x.data_ptr(), out.data_ptr(), n * c, (h, w), out_hw, kernel, stride, padding,
                                    torch.get_num_threads(), pool=_pool())
        return out
