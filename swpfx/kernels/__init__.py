"""Compiled CPU kernels for stripe-pruned convolutions (optional; built on first use with the system C++ compiler).

- :mod:`swpfx.kernels.stripe_conv` -- a fused stripe-sparse direct convolution
  (DESIGN.md §4b, issue 14): ``is_available()``, ``pack_weights(weight, mask)``,
  ``stripe_conv2d(x, packed, bias=None, stride=1, padding=None, dilation=1, threads=2)``
  (zero padding, any stride and dilation; threads share the work as output row
  bands x filter groups, see ``stripe_conv.partition``).

Nothing here is needed by the standard-op lowering; when no compiler is present
``stripe_conv.is_available()`` is False and ``stripe_conv.unavailable_reason()``
says why.
"""
