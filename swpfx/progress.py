"""Progress bars that follow tqdm's convention for logs: shown on a terminal, silent when piped.

``disable=None`` is tqdm's own switch for this: the bar disables itself when its
stream (stderr by default) is not a TTY, so a redirected log gets no
carriage-return updates at all.

Example:
    >>> import io
    >>> log = io.StringIO()                        # not a terminal, like a piped log
    >>> sum(progress_bar(range(1000), "epoch 1/1", file=log)), log.getvalue()
    (499500, '')
"""

from __future__ import annotations


def progress_bar(iterable, desc: str, progress: bool = True, file=None):
    """A tqdm bar over ``iterable``; off when ``progress`` is False or ``file`` (default stderr) is not a TTY."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=None if progress else True, leave=True, dynamic_ncols=True, file=file)
