"""How many threads the native time loop uses: measured per call shape, so a busy machine does not stall it.

The native loops (``csrc/``) split a layer's hidden units over threads that
meet at a barrier every time step (or, with enough batch rows, split the rows
and meet only at the end). On a quiet machine all of torch's threads
help. When another process keeps a core busy, the OS puts one of our threads
aside for a whole time slice (milliseconds) and the others wait at the
barrier, so single calls take many times their quiet time, and a thread count
that is right on a quiet machine becomes the slowest one.

So the count is chosen by measurement, per call shape, from two candidates:
torch's intra-op count N and N // 2 (for 2 cores: 2 and 1). It holds for the
whole call: the time loops and the weight GEMMs that MKL runs inside it; a
training step's forward and backward share one count and are timed together
(the backward times itself in C++, and its time is recorded at the next step of
that shape). Every native call is timed; the candidate in use is kept while the
median of its last three times is no worse than the other's; the other one is
re-timed now and then (8 calls after a switch, then backing off, doubling up to
every 128 calls while it keeps losing), and the fewer at once when all threads
turn 1.5x slower than their best (the fewer's times may be old, or none), so the choice
follows the machine both ways at a cost well under 1% on a quiet one.

Outputs do not depend on the count (each hidden unit of each row is computed
with the same arithmetic, whichever thread it is), but some gradient sums may
differ in the last bit (float64 loops; float32 bias gradients when the rows are
split), so with ``torch.use_deterministic_algorithms(True)`` the count stays
fixed at torch's.

The count holds inside grulab's calls only; :func:`steer_torch` (``grulab train`` turns it
on) lets torch's own ops in the rest of a step follow it.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

FIRST_PROBE = 8  # calls before the other count is timed again, after a switch
MAX_INTERVAL = 128  # the longest wait between two probes of a losing count
WINDOW = 3  # times kept per count; their median decides
SLOWDOWN = 1.5  # the count in use this much slower than its best: the other is timed at the next call
MAX_KEYS = 4096  # call shapes remembered (forgotten all at once beyond)


@dataclass
class _State:
    counts: tuple[int, int]  # (in use, the other)
    recent: dict[int, deque] = field(default_factory=dict)
    interval: int = FIRST_PROBE
    countdown: int = FIRST_PROBE
    best: float = float("inf")  # the lowest median of the count in use since it became the one in use

    def median(self, n: int) -> float:
        times = self.recent.get(n)
        if not times:
            return float("inf")
        s = sorted(times)
        m = len(s) // 2
        return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


_states: dict[tuple, _State] = {}
_lock = threading.Lock()
_steer = False  # steer_torch(): torch's own count follows the governor's
_lowered: Optional[tuple[int, int]] = None  # (the user's count, the one grulab set) while lowered


def steer_torch(on: bool = True) -> None:
    """Let the governor set torch's own intra-op count too (off by default).

    The governor's count holds inside grulab's calls only. The rest of a training step (the
    loss, the optimizer, other layers) runs on torch's count, and beside a busy process each
    of torch's multi-thread regions waits for the core that process holds. With steering on,
    while the count in use for the last native call's shape is the lower one, torch runs on
    it as well (``torch.set_num_threads``), and gets the user's count back when a probe finds
    the machine quiet again (or steering is turned off, or deterministic mode is on).

    It changes a setting of the whole process (and with it, where their sums are split, the
    last bits of other ops' results), so it is the application's choice: ``grulab train``
    turns it on unless ``--threads`` is given. A count set with ``torch.set_num_threads``
    while lowered is the user's from then on (unless it equals the lowered one)."""
    global _steer
    with _lock:
        _steer = bool(on)
        if not on:
            _follow(0, 0)


@contextmanager
def steering(on: bool = True) -> Iterator[None]:
    """``steer_torch(on)`` for a block, then back as it was."""
    with _lock:
        before = _steer
    steer_torch(on)
    try:
        yield
    finally:
        steer_torch(before)


def _follow(n: int, want: int) -> None:  # under _lock: torch's count := want, n the user's
    global _lowered
    if _lowered is not None and torch.get_num_threads() != _lowered[1]:
        _lowered = None  # the user set a count since: theirs
    if _lowered is not None and want == n:  # quiet again, steering off, or deterministic mode
        torch.set_num_threads(_lowered[0])
        _lowered = None
    elif want != n and (_lowered is None or _lowered[1] != want):
        torch.set_num_threads(want)
        _lowered = (n, want)


def _torch_count() -> int:
    """The user's intra-op count for torch (torch's, unless steering lowered it), or 0 where
    there is nothing to choose (1 thread, deterministic mode)."""
    n = torch.get_num_threads()
    lowered = _lowered
    if lowered is not None and n == lowered[1]:
        n = lowered[0]
    if n < 2 or torch.are_deterministic_algorithms_enabled():
        if lowered is not None:
            with _lock:
                _follow(0, 0)
        return 0
    return n


def choose(key: tuple) -> int:
    """The thread count for the next native call of this shape (0: torch's own, nothing to choose)."""
    n = _torch_count()
    if n == 0:
        return 0
    with _lock:
        return _choose(key, n)


def _choose(key: tuple, n: int) -> int:  # under _lock
    state = _states.get(key)
    if state is None or n not in state.counts:  # new shape, or torch.set_num_threads since
        if len(_states) >= MAX_KEYS:
            _states.clear()
        state = _states[key] = _State((n, max(1, n // 2)))
    state.countdown -= 1
    if _steer:
        _follow(n, state.counts[0])
    return state.counts[1] if state.countdown <= 0 else state.counts[0]


def record(key: tuple, threads: int, seconds: float) -> None:
    """Tell the governor how long a call of this shape took with ``threads``."""
    with _lock:
        _record(key, threads, seconds)


def _record(key: tuple, threads: int, seconds: float) -> None:  # under _lock
    state = _states.get(key)
    if state is None or threads not in state.counts:
        return
    current, other = state.counts
    if threads == other:  # a probe: its fresh time against the current count's recent ones
        state.recent[other] = deque([seconds], maxlen=WINDOW)
        if seconds < state.median(current):  # it won: switch
            state.counts, state.interval, state.best = (other, current), FIRST_PROBE, float("inf")
        else:  # it lost: wait longer before the next one
            state.interval = min(2 * state.interval, MAX_INTERVAL)
        state.countdown = state.interval
        return
    times = state.recent.get(current)
    if times is None:
        times = state.recent[current] = deque(maxlen=WINDOW)
    times.append(seconds)
    if len(times) < WINDOW:
        return
    now = state.median(current)
    if now > state.median(other):
        # the count in use got slower than the other's last times: the machine got busy
        state.counts, state.interval, state.countdown = (other, current), FIRST_PROBE, FIRST_PROBE
        state.best = float("inf")
        return
    if current > other and now > SLOWDOWN * state.best:
        # all threads much slower than they were, while the fewer's times are old (or none): the
        # machine may have got busy, time the fewer now (not the other way: a probe of all
        # threads beside a busy process costs many calls' time, and quiet makes no one slower)
        state.countdown, state.interval, state.best = 1, FIRST_PROBE, now
    state.best = min(state.best, now)


def timed(key: tuple, call):
    """Run ``call(threads)`` with the governor's count for ``key`` and report its time."""
    threads = choose(key)
    if threads == 0:
        return call(0)
    t0 = time.perf_counter()
    result = call(threads)
    record(key, threads, time.perf_counter() - t0)
    return result


def forget() -> None:
    """Forget every call shape's times (the next call of each starts afresh on torch's count);
    torch's count back to the user's if steering lowered it."""
    with _lock:
        _states.clear()
        _follow(0, 0)


def snapshot() -> dict[tuple, int]:
    """The count in use per call shape seen in this process."""
    with _lock:
        return {key: state.counts[0] for key, state in _states.items()}
