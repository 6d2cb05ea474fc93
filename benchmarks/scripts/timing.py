"""What the benchmarks share: the median of interleaved repeats, and one step's peak memory.

``interleaved_medians`` times calls side by side in one loop (``ratios.py``, ``floor.py``,
``compare_step_time.py``, ``gpu_check.py``, and the studies in ``benchmarks/studies/``);
``peak_bytes`` gives the peak memory of one training step on CPU or CUDA, counted from before the
step's model and optimizer were built.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MEASURED = "timing.peak_bytes: measured step"


def interleaved_medians(
    calls: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 3,
    synchronize: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median wall time (s) of each call, every repeat running all calls in a fresh random order.

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it
    stops, so that a call's queued GPU work is timed with it and not with the next call.
    """
    wait = synchronize or (lambda: None)
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    shuffler = random.Random(0)
    for _ in range(repeats):
        # A fresh order every repeat: a fixed one biases a workload by where it runs (±7 % here,
        # e.g. right after a step that evicted the caches).
        shuffler.shuffle(order)
        for name in order:
            wait()
            start = time.perf_counter()
            calls[name]()
            wait()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def peak_bytes(build: Callable[[], Callable[[], object]], device: torch.device) -> int:
    """Peak memory (bytes) of the second call of the step that ``build()`` returns.

    Counted from before ``build`` runs, so the model, the optimizer state, and any buffer kept
    between steps are in it, not only what the step allocates and frees: two variants' peaks
    differ by everything each one holds. The first call is a warm-up, so that optimizer state and
    kept buffers exist as they do at every later step. Memory allocated before ``build`` (e.g. the
    shared batch) is in no variant's figure.
    """
    gc.collect()
    if device.type == "cuda":
        return _cuda_peak_bytes(build, device)
    return _cpu_peak_bytes(build)


def _cuda_peak_bytes(build: Callable[[], Callable[[], object]], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    step = build()
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _cpu_peak_bytes(build: Callable[[], Callable[[], object]]) -> int:
    """The CPU allocator keeps no statistics, so the profiler's allocation events are summed.

    With ``profile_memory=True`` the profiler records every CPU allocation and free (bytes, signed)
    while it runs. ``prof.events()`` is not enough: it folds each allocation into the operator it
    happened in (only those outside any operator stay ``[memory]`` events), which loses the order
    within an operator; the raw event stream (``prof.profiler.kineto_results.events()``, what
    ``prof.events()`` is built from) keeps every one with its time. The profiler runs from before
    ``build``: a block allocated before it started is freed without an event (torch warns
    "Memory block of unknown size"), which would leave, e.g., the warm-up's gradients counted as
    live after ``zero_grad`` frees them. The running sum from the profiler's start, maximised over
    the measured step, is the peak; the same step measures the same bytes on every run
    (``tests/test_benchmark_scripts.py`` checks).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = build()
        step()
        with record_function(MEASURED):
            step()
    events = prof.profiler.kineto_results.events()
    marker = next(event for event in events if event.name() == MEASURED)
    allocations = sorted(
        (event for event in events if event.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    level = peak = 0
    for event in allocations:
        inside = marker.start_ns() <= event.start_ns() <= marker.end_ns()
        if inside:  # also the level the step starts from, should its first event be a free
            peak = max(peak, level)
        level += event.nbytes()
        if inside:
            peak = max(peak, level)
    return peak
