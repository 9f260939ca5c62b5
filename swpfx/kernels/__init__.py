"""What a converted model runs on in PyTorch (``convert(lowering="fused")``), beyond standard ops.

- :mod:`swpfx.kernels.stripe_conv` -- a fused stripe-sparse direct convolution, compiled
  on first use with the system C++ compiler (DESIGN.md §4b, issue 14): ``is_available()``,
  ``pack_weights(weight, mask)``, ``stripe_conv2d(x, packed, bias=None, stride=1,
  padding=None, dilation=1, threads=2)`` (zero padding, any stride and dilation; threads
  share the work as output row bands x filter groups, see ``stripe_conv.partition``);
- :mod:`swpfx.kernels.fused_conv` -- that kernel as a PyTorch operator and the module
  ``FusedStripeConv2d`` that takes a stripe conv's place in the graph;
- :mod:`swpfx.kernels.max_pool` -- ``CompiledMaxPool2d``, the graph's max pools run by the
  compiled pool of the same library (PyTorch's own NCHW max pool is the slowest op left in a fused graph).

Nothing here is needed by the standard-op lowering; when no compiler is present
``stripe_conv.is_available()`` is False and ``stripe_conv.unavailable_reason()``
says why.
"""

import torch


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def is_traced() -> bool:
    """Whether the current call is being recorded -- ``torch.jit`` tracing (the TorchScript ONNX exporter),
    ``torch.compile`` or ``torch.export`` (the dynamo ONNX exporter) -- then the modules here run standard ops.

    Asked on every kernel call, so only the cheap flags (``torch.onnx.is_in_onnx_export()`` costs 1 us).
    """
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or _is_exporting()
