"""The one interleaved timing loop (runtime-model calibration, ``swpfx bench``, the demo, ``benchmarks/``).

Every round runs each candidate once, in alternating order (A B C, C B A, …), so
a burst of load from other processes hits all candidates alike; the estimate is
the median per block of ``rounds`` rounds and the minimum over ``blocks`` blocks
(a disturbed block spoils that block, not the estimate).

Example:
    >>> import time
    >>> t = interleaved_medians({"short": lambda: time.sleep(0.001), "long": lambda: time.sleep(0.004)},
    ...                         rounds=5, warmup=1)
    >>> sorted(t), t["short"] < t["long"]
    (['long', 'short'], True)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from swpfx.export import ort_session


def interleaved_medians(callables: dict[str, Callable[[], object]], rounds: int = 100, warmup: int = 5,
                        blocks: int = 1, burst: int = 1) -> dict[str, float]:
    """Seconds per call of each callable: interleaved rounds, median per block, minimum over blocks.

    Each round runs every callable ``burst`` times back to back (order reversed
    every other round). ``burst > 1`` is for callables on different runtimes:
    PyTorch's OpenMP threads spin for a while after each op, and an ONNX Runtime
    call right after one ran 10-15 % slower (RESULTS.md); in a burst only the
    first call pays that, and the median ignores it.
    """
    names = list(callables)
    for _ in range(warmup):
        for name in names:
            callables[name]()
    best = {name: float("inf") for name in names}
    for _ in range(blocks):
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                for _ in range(burst):
                    t0 = time.perf_counter()
                    callables[name]()
                    times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            best[name] = min(best[name], statistics.median(ts))
    return best


def session_runner(session, x) -> Callable[[], object]:
    """A no-argument call running the ORT ``session`` on ``x``: one input (tensor or array) or a tuple of them,
    fed to the session's inputs in order."""
    inputs = x if isinstance(x, tuple) else (x,)
    feed = {i.name: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
            for i, v in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feed)


def time_sessions(sessions: dict, x, rounds: int = 100, warmup: int = 5, blocks: int = 1) -> dict[str, float]:
    """Seconds per run of each ORT session, timed by :func:`interleaved_medians`.

    ``x`` is every session's input, or a dict {session name: input}.
    """
    runners = {name: session_runner(s, x[name] if isinstance(x, dict) else x) for name, s in sessions.items()}
    return interleaved_medians(runners, rounds=rounds, warmup=warmup, blocks=blocks)


def ort_latency_ms(paths: dict, x: torch.Tensor, rounds: int = 100, warmup: int = 10,
                   threads: int = 2) -> dict[str, float]:
    """Median milliseconds per run of each ONNX file (``swpfx.export.ort_session``) on ``x``, interleaved.

    Example:
        >>> ort_latency_ms({"a": "dense.onnx", "b": "pruned.onnx"}, torch.randn(64, 1, 28, 28))  # doctest: +SKIP
        {'a': 1.9, 'b': 0.8}
    """
    sessions = {name: ort_session(path, threads) for name, path in paths.items()}
    return {name: 1e3 * t for name, t in time_sessions(sessions, x, rounds=rounds, warmup=warmup).items()}


def torch_and_ort_latencies(torch_models: dict, onnx_paths: dict, example_inputs, threads: int = 2, rounds: int = 10,
                            burst: int = 5, blocks: int = 3) -> dict[str, float]:
    """Milliseconds per run of PyTorch models (eager, ``no_grad``) and ONNX files in ORT, side by side in bursts.

    For comparing a model deployed in PyTorch (``convert(lowering="fused")``) with
    ORT: ``burst`` back-to-back calls per turn (:func:`interleaved_medians`), as
    torch's OpenMP threads spin after each op and slow an ORT call that follows
    at once. Names must differ between the two dicts.
    """
    from swpfx.tracing import normalize_example_inputs

    inputs = normalize_example_inputs(example_inputs)
    if set(torch_models) & set(onnx_paths):
        raise ValueError(f"swpfx.timing: names used twice: {sorted(set(torch_models) & set(onnx_paths))}")
    runners = {}
    for name, model in torch_models.items():
        def run(model=model):
            with torch.no_grad():
                return model(*inputs)
        runners[name] = run
    for name, path in onnx_paths.items():
        runners[name] = session_runner(ort_session(path, threads), inputs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = interleaved_medians(runners, rounds=rounds, warmup=5, blocks=blocks, burst=burst)
        return {name: s * 1e3 for name, s in seconds.items()}
    finally:
        torch.set_num_threads(previous)


def latencies(models: dict, example_inputs, threads: int = 2, rounds: int = 50, warmup: int = 5,
              blocks: int = 3) -> dict[str, float]:
    """Measured ONNX Runtime milliseconds per run of each model on ``example_inputs``, timed side by side.

    Each value is an ``nn.Module`` (exported with ``swpfx.export_onnx`` and verified
    against torch) or the path of an ONNX file. Sessions come from
    :func:`swpfx.export.ort_session` (``threads`` intra-op threads, spinning off);
    runs are interleaved (:func:`interleaved_medians`, ``blocks`` blocks of
    ``rounds`` rounds).
    """
    import tempfile
    from pathlib import Path

    from torch import nn

    from swpfx.export import export_onnx
    from swpfx.tracing import normalize_example_inputs

    inputs = normalize_example_inputs(example_inputs)
    with tempfile.TemporaryDirectory() as directory:
        sessions = {}
        for i, (name, model) in enumerate(models.items()):
            path = model
            if isinstance(model, nn.Module):
                path = export_onnx(model, inputs, Path(directory) / f"model{i}.onnx").path
            sessions[name] = ort_session(path, threads)
        runners = {name: session_runner(session, inputs) for name, session in sessions.items()}
        seconds = interleaved_medians(runners, rounds=rounds, warmup=warmup, blocks=blocks)
    return {name: 1e3 * t for name, t in seconds.items()}


def latency(model_or_onnx, example_inputs, threads: int = 2, rounds: int = 50) -> float:
    """Measured ONNX Runtime milliseconds per run of one model (see :func:`latencies`).

    Example:
        >>> import torch, swpfx
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> swpfx.latency(model, (torch.randn(1, 3, 32, 32),), rounds=5) > 0
        True
    """
    return latencies({"model": model_or_onnx}, example_inputs, threads=threads, rounds=rounds)["model"]


def op_times(onnx_path, example_inputs, threads: int = 2, rounds: int = 50, warmup: int = 10) -> dict[str, tuple]:
    """Where ORT spends its time: {op type: (ms per run, nodes per run)}, slowest first, from ORT's profiler.

    Op types are those of the graph ORT runs after its optimisations, so layout
    changes show up as ``ReorderInput``/``ReorderOutput`` nodes of the NCHWc
    transformer. Profiling costs a little time per node; compare op types, not
    totals, with :func:`latencies`.

    Example:
        >>> import torch, swpfx, tempfile, os
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
        >>> _ = swpfx.export_onnx(model, (x,), path)
        >>> "Conv" in op_times(path, (x,), rounds=3, warmup=1)
        True
    """
    import json
    import os
    import tempfile
    from collections import defaultdict

    with tempfile.TemporaryDirectory() as directory:
        session = ort_session(onnx_path, threads, profile_prefix=os.path.join(directory, "ort"))
        feed = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), example_inputs)}
        for _ in range(warmup + rounds):
            session.run(None, feed)
        with open(session.end_profiling()) as trace:
            events = [e for e in json.load(trace) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    events.sort(key=lambda e: e["ts"])
    totals, counts = defaultdict(float), defaultdict(int)
    for event in events[len(events) * warmup // (warmup + rounds):]:  # every run executes the same nodes
        totals[event["args"]["op_name"]] += event["dur"] / 1e3 / rounds
        counts[event["args"]["op_name"]] += 1
    return {op: (ms, round(counts[op] / rounds)) for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])}
