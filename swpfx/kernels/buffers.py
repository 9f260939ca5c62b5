"""``KernelBuffers``: the reused output memory of a fused graph's kernel calls (``convert(lowering="fused")``).

A fused graph's kernel calls (``FusedStripeConv2d``, ``CompiledMaxPool2d``) each
wrote a freshly allocated output. Most of those outputs are read only by the
next kernel calls and are dead soon after, so ``plan_kernel_buffers`` gives each
such call a *slot*: calls whose outputs are never alive at once share a slot,
and a slot's memory is kept from one forward to the next. That is what fresh
allocations cost: in a fused ResNet-18 (batch 1, 224², 2 threads) the kernel
calls writing into planned slots ran 10 % faster than the same calls writing
fresh tensors (8.3 -> 7.5 ms; the outputs stay in cache where the next call
reads them), while the Python around the calls cost under 1 %
(``benchmarks/RESULTS.md``).

The graph asks for the buffers once, at its start (``kernel_buffers =
self.kernel_buffers()``), and passes them to each planned call
(``self.conv(x, buffers=kernel_buffers, slot=2)``). Each thread has its own
buffers, so concurrent forwards on one model never share memory. Outputs that
leave the kernel calls (read by any other op, or returned) are never planned:
they are fresh tensors, as before. A call whose module has forward hooks writes
a fresh tensor too, so a hook never keeps a tensor that a later call overwrites.
Under tracing and export the buffers are ``None`` and every call runs as before.

The memory stays allocated while the model lives, sized for the largest input
seen; :meth:`KernelBuffers.release` frees this thread's.

Example:
    >>> import torch
    >>> from swpfx.kernels.buffers import KernelBuffers
    >>> buffers = KernelBuffers(slots=2)()
    >>> a = buffers.take(0, (1, 4, 8, 8)); b = buffers.take(0, (1, 4, 8, 8))
    >>> a.data_ptr() == b.data_ptr(), tuple(a.shape)
    (True, (1, 4, 8, 8))
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import nn

from swpfx.kernels import is_traced
from swpfx.passes.count_costs import OpCall, OpCount, register

__all__ = ["KernelBuffers", "SlotBuffers", "writes_fresh_output"]


class SlotBuffers:
    """One thread's memory for the slots of one :class:`KernelBuffers`: ``take(slot, shape)`` is a float32
    tensor of that shape in the slot's memory (grown when too small, the same tensor for the same shape)."""

    __slots__ = ("_memory", "_views")

    def __init__(self, slots: int):
        self._memory: list[torch.Tensor | None] = [None] * slots
        self._views: dict[tuple, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple) -> torch.Tensor:
        view = self._views.get((slot, shape))
        if view is None:
            numel = math.prod(shape)
            memory = self._memory[slot]
            if memory is None or memory.numel() < numel:
                with torch.inference_mode(False):  # a plain tensor, usable in and out of inference mode
                    memory = self._memory[slot] = torch.empty(numel)  # 64-byte aligned, as the kernel prefers
                self._views = {key: v for key, v in self._views.items() if key[0] != slot}
            view = self._views[(slot, shape)] = memory[:numel].view(shape)
        return view


# KernelBuffers -> threading.local holding that module's SlotBuffers for each thread. Outside the module, so
# that deepcopies and pickles of a model never carry its buffers.
_PER_THREAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class KernelBuffers(nn.Module):
    """The output memory of a fused graph's planned kernel calls (see the module docstring).

    ``forward()`` returns this thread's :class:`SlotBuffers` (``None`` while
    traced or exported); ``slots`` is how many the plan uses.
    """

    def __init__(self, slots: int):
        super().__init__()
        if slots < 1:
            raise ValueError(f"swpfx.KernelBuffers: slots must be >= 1, got {slots}")
        self.slots = int(slots)

    def forward(self) -> SlotBuffers | None:
        if is_traced():
            return None
        local = _PER_THREAD.get(self)
        if local is None:
            local = _PER_THREAD.setdefault(self, threading.local())
        buffers = getattr(local, "buffers", None)
        if buffers is None or len(buffers._memory) != self.slots:
            buffers = local.buffers = SlotBuffers(self.slots)
        return buffers

    def release(self) -> None:
        """Free this thread's buffers (they are allocated again by the next forward)."""
        local = _PER_THREAD.get(self)
        if local is not None:
            local.buffers = None

    def extra_repr(self) -> str:
        return f"slots={self.slots}"


def writes_fresh_output(module: nn.Module) -> bool:
    """Whether ``module``'s call must return a tensor of its own: forward hooks (its own or global) would see,
    and might keep, an output that a later call overwrites."""
    return bool(module._forward_hooks or nn.modules.module._global_forward_hooks)


@register(KernelBuffers)
def kernel_buffers(call: OpCall) -> OpCount:
    """Hands out memory: no arithmetic, no traffic."""
    return OpCount(0, 0, "memory", traffic="none")
