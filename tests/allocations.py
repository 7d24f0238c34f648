"""Peak bytes the torch CPU allocator handed out while a call ran, from the profiler's memory events: what the
memory tests pin the dry-run estimates (`sparsegpt.run.memory`) and the pass's own peaks to."""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes held at once beyond what was allocated before `fn` ran: the running sum of the allocations
    and frees the profiler recorded during the call."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocation"
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak
