"""Evaluate in eval mode, then restore: the one helper the passes and swpfx use for it (a helper, not a pass).

``model.train(flag)`` afterwards would set *every* submodule to the root's flag,
so a BatchNorm frozen in eval mode inside a training model would come back in
train mode; :func:`eval_mode` restores each module's own flag.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    >>> _ = model[1].eval()                      # a frozen BatchNorm
    >>> with eval_mode(model):
    ...     [m.training for m in model.modules()]
    [False, False, False]
    >>> [m.training for m in model.modules()]
    [True, True, False]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every submodule of ``models`` in eval mode; afterwards restore each one's own training flag.

    A module that a graph edit put in the tree meanwhile (a pruned BatchNorm
    replacing the original, a lowering's container) takes the flag recorded for
    its path, or for its nearest recorded ancestor.
    """
    flags = {id(m): (m, m.training) for model in models for m in model.modules()}
    by_path = [(model, {path: m.training for path, m in model.named_modules()}) for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in flags.values():
            m.training = training
        for model, recorded in by_path:
            for path, m in model.named_modules():
                if id(m) in flags:
                    continue
                while path not in recorded:
                    path = path.rpartition(".")[0]  # "" (the root) is always recorded
                m.training = recorded[path]
