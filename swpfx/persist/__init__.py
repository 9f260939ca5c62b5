"""``swpfx.save`` / ``swpfx.load``: persist prepared, converted or plain traced GraphModules safely.

One ``.safetensors`` file holds everything:

* the tensors (parameters, buffers, tensor attributes, and tensors found in
  ``meta["swpfx"]`` such as stripe masks) as safetensors data, which is read
  as raw numbers and can never execute code;
* in its metadata header, a JSON *plan*: the module tree (each module as an
  allowlisted ``torch.nn`` type with its constructor arguments, or a plain
  container), every tensor's path, kind, shape and dtype, every graph node (op,
  name, target, args/kwargs as tagged JSON), ``node.meta["swpfx"]`` and
  ``tensor_meta``, and ``model.meta["swpfx"]``;
* a SHA-256 of the plan and the tensors, so a corrupted file is detected.

Loading never unpickles and never imports or calls a name taken from the file
that is not on an allowlist: call_function targets resolve only to tensor
functions of ``torch`` / ``torch.nn.functional`` (those taking part in
``__torch_function__``), listed ``operator`` and ``math`` functions,
``builtins.getattr`` (of tensor properties such as ``shape`` only), ``torchvision.ops`` and the
functions torchvision's traced models wrap; call_method targets only to public
``torch.Tensor`` methods (no hooks, no ``apply_``); node names, targets and
keyword names must be plain identifiers (they become Python code when FX
generates ``forward``). Any violation, a truncated or bit-flipped file, or a
tensor whose shape or dtype disagrees with the plan or with the module that owns
it raises ``ValueError`` and returns nothing.

A call_module target must be an allowlisted module type (what torchvision's
classification models use after tracing); a user leaf module of another type
cannot be saved (``save`` raises ``ValueError`` naming it). Modules that the
graph never calls (e.g. a custom Conv2d subclass that tracing went through)
are restored as plain ``nn.Module`` containers holding their tensors.

Example:
    >>> import torch, torchvision, swpfx
    >>> from swpfx.persist import save, load
    >>> x = torch.randn(1, 3, 32, 32)
    >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10).eval(), (x,))
    >>> _ = save(prepared, "/tmp/resnet18-prepared.safetensors")
    >>> loaded = load("/tmp/resnet18-prepared.safetensors")
    >>> torch.equal(loaded(x), prepared(x)), list(swpfx.skeletons(loaded))[:2]
    (True, ['conv1', 'layer1.0.conv1'])
"""

from .container import digest as _digest  # noqa: F401  (tests check the checksum)
from .loading import load
from .planning import save

__all__ = ["load", "save"]
