"""The fused stripe kernel as a PyTorch operator and module (issue 14, ``convert(lowering="fused")``).

``torch.ops.swpfx.stripe_conv2d(x, weight, mask, bias, residual, stride, padding,
dilation, relu, threads)`` is ``act(conv2d(x, weight * mask[:, None], bias) +
residual)`` computed by :mod:`swpfx.kernels.stripe_conv`, which multiplies only
the kept stripes. It is registered with :mod:`torch.library` (CPU, float32, with
a fake implementation for tracing). The weight is packed for the kernel on
first use, and the packing is kept until the weight or the mask changes.

:class:`FusedStripeConv2d` is what ``convert(lowering="fused")`` puts in the
graph in place of a stripe-pruned conv (and the BatchNorm, residual add and ReLU
it absorbed). It uses the kernel for float32 CPU inputs that need no gradient;
everywhere else -- autograd, other dtypes or devices, ``torch.export`` /
ONNX export, a machine without a compiler -- it runs the same arithmetic with
standard ops (a dense conv with the pruned stripes zeroed). So an ONNX export of
a fused model holds plain convs, and ONNX Runtime runs them densely.

Example:
    >>> import torch
    >>> from swpfx.kernels.fused_conv import FusedStripeConv2d
    >>> from swpfx.masks import random_stripe_mask
    >>> conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    >>> mask = random_stripe_mask(16, 3, 3, generator=torch.Generator().manual_seed(0))
    >>> fused = FusedStripeConv2d.from_conv(conv, mask, relu=True)
    >>> x = torch.randn(2, 8, 12, 12)
    >>> expected = torch.relu(torch.nn.functional.conv2d(x, conv.weight * mask[:, None], conv.bias, padding=1))
    >>> torch.allclose(fused(x), expected, atol=1e-4)
    True
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from swpfx.kernels import is_traced, stripe_conv
from swpfx.kernels.buffers import SlotBuffers, writes_fresh_output
from swpfx.passes.count_costs import OpCall, OpCount, bias_flops, register, stripe_macs

__all__ = ["FusedStripeConv2d", "kernel_applies", "unsupported_reason"]

# id(weight) -> (weakref to weight, key, packing, {call arguments: BoundStripeConv}); an entry goes when its weight
# is freed. (Not an attribute on the tensor: that would follow the tensor through deepcopy and pickling.)
_PACKINGS: dict[int, tuple] = {}


def _bound_call(weight: torch.Tensor, mask: torch.Tensor, input_shape: tuple, stride, padding, dilation, relu: bool,
                threads: int) -> stripe_conv.BoundStripeConv:
    """The kernel call for these arguments: weights packed, checks done and plan built once, until the
    weight or the mask changes (their versions are part of the key) or ``weight`` is freed."""
    key = (weight._version, mask._version, mask.data_ptr(), weight.data_ptr(), tuple(weight.shape))
    entry = _PACKINGS.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != key:
        if entry is None or entry[0]() is not weight:
            weakref.finalize(weight, _PACKINGS.pop, id(weight), None)
        entry = (weakref.ref(weight), key, stripe_conv.pack_weights(weight.detach(), mask.detach()), {})
        _PACKINGS[id(weight)] = entry
    args = (tuple(input_shape), tuple(stride), tuple(padding), tuple(dilation), bool(relu), int(threads))
    bound = entry[3].get(args)
    if bound is None:
        bound = entry[3][args] = stripe_conv.bind(entry[2], *args[:4], relu=relu, threads=threads, pool=_pool())
    return bound


@functools.lru_cache(maxsize=1)
def _pool() -> str:
    """The kernel build for use inside torch: the one on torch's OpenMP threads where it builds, else its own pool.

    One pool for torch's ops and the kernel: in a fused ResNet-18 the OpenMP build ran 13-17 % faster end to end
    than the kernel's own pool, whose workers and torch's contended for the cores (benchmarks/RESULTS.md).
    """
    return "openmp" if stripe_conv.is_available("openmp") else "own"


def _run_kernel(x, weight, mask, bias, residual, stride, padding, dilation, relu: bool, threads: int) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":  # the kernel reads raw float32 memory
        raise ValueError(f"swpfx.FusedStripeConv2d: the kernel takes float32 CPU input, got {x.dtype} on {x.device}")
    bound = _bound_call(weight, mask, x.shape, stride, padding, dilation, relu, threads)
    bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
    return _run_bound(bound, bias, x, residual)


def _output_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, ...]:
    return (x.shape[0], weight.shape[0],
            *(stripe_conv.output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
              for i in (0, 1)))


class _KernelCall:
    """One module's kernel call for one input shape (``FusedStripeConv2d._kernel_call``): the bound kernel and
    the float32 bias, and the state they were made from. A fused ResNet-18 spends ~35 us per conv in Python in a
    forward; resolving this once instead of per call took 0.53 ms off its ~9 ms (2 threads)."""

    __slots__ = ("bound", "bias", "state", "sources")

    def __init__(self, module: FusedStripeConv2d, x: torch.Tensor, threads: int):
        m = module
        self.bound = _bound_call(m.weight, m.mask, x.shape, m.stride, m.padding, m.dilation, m.relu, threads)
        self.bias = None if m.bias is None else m.bias.detach().to(torch.float32).contiguous()
        self.state = self.state_of(m, x, threads)
        self.sources = (m.weight, m.mask, m.bias)  # held, so that their ids in `state` stay theirs

    @staticmethod
    def state_of(m: FusedStripeConv2d, x: torch.Tensor, threads: int) -> tuple:
        """What the call depends on: the input shape, the threads, and which weight, mask and bias with which
        contents (versions count in-place edits, data pointers storage swapped under the same tensor). Read
        from the module's dicts directly: ``nn.Module.__getattr__`` made this check 5 us."""
        w, b, k = m._parameters["weight"], m._parameters["bias"], m._buffers["mask"]
        return (x.shape, threads, id(w), w._version, w.data_ptr(), id(k), k._version, k.data_ptr(),
                id(b), None if b is None else (b._version, b.data_ptr()))


# module -> its _KernelCall; an entry goes with its module
_KERNEL_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _run_bound(bound: stripe_conv.BoundStripeConv, bias: torch.Tensor | None, x: torch.Tensor,
               residual: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``bound`` on float32 CPU ``x`` of its input shape, with a float32 contiguous ``bias`` and an optional
    residual (checked here), into ``out`` (contiguous float32 of the output shape, aliasing neither input) or a
    new tensor."""
    if _pool() == "own":
        bound.wake()  # the pool's workers wake while the arguments are checked
    if not x.is_contiguous():
        x = x.contiguous()
    if residual is not None:
        if residual.shape != bound.output_shape or residual.dtype is not torch.float32 or not residual.is_cpu:
            raise ValueError(f"swpfx.FusedStripeConv2d: the residual must be float32 on the CPU of shape "
                             f"{tuple(bound.output_shape)}, got {residual.dtype} {tuple(residual.shape)}")
        if not residual.is_contiguous():
            residual = residual.contiguous()
    if out is None:
        out = torch.empty(bound.output_shape)  # torch's CPU allocator aligns to 64 bytes, as the kernel prefers
    bound.run_addresses(x.data_ptr(), out.data_ptr(), None if bias is None else bias.data_ptr(),
                        None if residual is None else residual.data_ptr())
    return out


@torch.library.custom_op("swpfx::stripe_conv2d", mutates_args=(), device_types="cpu")
def stripe_conv2d_op(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                     residual: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                     relu: bool, threads: int) -> torch.Tensor:
    return _run_kernel(x, weight, mask, bias, residual, stride, padding, dilation, relu, threads)


@stripe_conv2d_op.register_fake
def _(x, weight, mask, bias, residual, stride, padding, dilation, relu, threads):
    return x.new_empty(_output_shape(x, weight, stride, padding, dilation))


def unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why the kernel cannot run ``conv`` (None when it can): it does ungrouped, zero-padded 2-D convs."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    if conv.groups != 1:
        return f"groups={conv.groups} (the kernel does ungrouped convs)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} / padding_mode {conv.padding_mode!r} (the kernel takes explicit zero padding)"
    if conv.kernel_size[0] * conv.kernel_size[1] > 64:
        return f"kernel {conv.kernel_size} has more than 64 taps"
    return None


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` goes to the kernel: float32 on the CPU, no autograd, not traced, kernel built."""
    return (x.dtype is torch.float32 and x.is_cpu and x.dim() == 4 and not (torch.is_grad_enabled() and x.requires_grad)
            and not is_traced() and stripe_conv.is_available(_pool()))


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A parameter that takes no gradient: counted as the model's weights, never trained here."""
    return nn.Parameter(t, requires_grad=False)


class FusedStripeConv2d(nn.Module):
    """``act(conv(x) + residual)`` for a stripe-pruned conv, run by the fused kernel (see the module docstring).

    Holds ``weight`` (O, C, Kh, Kw, pruned stripes zero) and ``bias`` as parameters
    that take no gradient (it is an inference module; they count as the model's
    parameters) and ``mask`` (bool (O, Kh, Kw), the kept stripes) as a buffer.
    ``forward(x)`` or, with ``residual=True``, ``forward(x, residual)``; in a
    graph planned by ``plan_kernel_buffers`` also ``buffers=..., slot=k``: a
    kernel call then writes its output into that slot
    (:mod:`swpfx.kernels.buffers`), any other call ignores them.
    ``threads``: the kernel's threads (on torch's OpenMP threads where the
    OpenMP build compiles, else the kernel's own pool); 0, the default, takes
    ``torch.get_num_threads()`` at each call.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, relu: bool = False, residual: bool = False, threads: int = 0):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.relu, self.residual, self.threads = bool(relu), bool(residual), int(threads)
        self.groups = 1  # read like a Conv2d's (ConvGeometry.of)
        self.weight = _frozen(torch.zeros(out_channels, in_channels, *self.kernel_size))
        self.register_buffer("mask", torch.zeros(out_channels, *self.kernel_size, dtype=torch.bool))
        self.bias = _frozen(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor, *, relu: bool = False, residual: bool = False,
                  scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                  threads: int = 0) -> FusedStripeConv2d:
        """The fused form of ``conv`` under ``mask``, with an optional per-channel affine (a folded
        BatchNorm: ``scale * conv(x) + shift``) applied to its weight and bias."""
        reason = unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"swpfx.FusedStripeConv2d: cannot fuse this conv: {reason}")
        has_bias = conv.bias is not None or shift is not None
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=has_bias, relu=relu, residual=residual, threads=threads)
        with torch.no_grad():
            weight = conv.weight.detach() * mask[:, None].to(conv.weight.dtype)
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
            if scale is not None:
                weight = weight * scale[:, None, None, None]
                bias = bias * scale
            if shift is not None:
                bias = bias + shift
            fused.weight = _frozen(weight.float().contiguous().to(conv.weight.device))
            fused.mask = mask.to(torch.bool).clone().to(conv.weight.device)
            if has_bias:
                fused.bias = _frozen(bias.float().to(conv.weight.device))
        return fused

    def _kernel_call(self, x: torch.Tensor) -> _KernelCall:
        """The kernel call for ``x``'s shape, resolved once and kept (outside the module, so that copies and
        pickles never carry it) until the shape, the thread count, or the weight, mask or bias changes."""
        threads = self.threads or torch.get_num_threads()
        call = _KERNEL_CALLS.get(self)
        if call is None or call.state != _KernelCall.state_of(self, x, threads):
            call = _KERNEL_CALLS[self] = _KernelCall(self, x, threads)
        return call

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, relu={self.relu}, "
                f"residual={self.residual}, threads={self.threads}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *,
                buffers: SlotBuffers | None = None, slot: int | None = None) -> torch.Tensor:
        if self.residual != (residual is not None):
            raise ValueError(f"swpfx.FusedStripeConv2d: built with residual={self.residual}, called "
                             f"{'with' if residual is not None else 'without'} a residual")
        if kernel_applies(x):  # the op's arithmetic without its dispatch (~0.1 ms per call) or its per-call checks
            call = self._kernel_call(x)
            out = None if buffers is None or writes_fresh_output(self) else buffers.take(slot, call.bound.output_shape)
            return _run_bound(call.bound, call.bias, x, residual, out)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


@register(FusedStripeConv2d)
def fused_stripe_conv(call: OpCall) -> OpCount:
    """Only the kept stripes are multiplied; bias, residual add and ReLU are elementwise extras."""
    m, out = call.module, call.out
    macs = stripe_macs(out.numel() // m.out_channels, m.in_channels, int(m.mask.sum()))
    extras = bias_flops(call, m.bias) + call.out_numel * (int(m.residual) + int(m.relu))
    return OpCount(macs, extras, "conv")
