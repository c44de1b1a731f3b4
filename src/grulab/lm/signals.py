"""Stop a long loop cleanly on Ctrl-C, SIGTERM or SIGHUP.

Schedulers, ``timeout``, torchrun and a closed terminal end a run with SIGTERM
or SIGHUP, not Ctrl-C; all three are treated alike. The first signal only sets
a flag, so the loop can finish its batch, save and stop; a second one quits at
once (KeyboardInterrupt out of wherever the program is).

    with StopOnSignal() as stop:
        for batch in batches:
            if stop.requested:
                save(); raise stop.interrupt()   # KeyboardInterrupt; stop.exit_code is 128 + signal
            step(batch)
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class StopOnSignal:
    """A context manager: the first SIGINT/SIGTERM/SIGHUP sets ``requested``, a second raises Stopped.

    Outside the main thread (where Python cannot take signals) it does nothing.
    """

    def __init__(self, message: str = "stopping after this batch (again to quit without saving)") -> None:
        self.message = message
        self.requested = False
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it (130 for Ctrl-C)."""
        return 128 + (self.signum or signal.SIGINT)

    def interrupt(self) -> Stopped:
        """The exception to raise once the loop has stopped and saved."""
        return Stopped(self.signum or signal.SIGINT)

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise Stopped(signum)
        self.requested, self.signum = True, signum
        print(f"\n{signal.Signals(signum).name}: {self.message}", flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            if previous is not None:  # None: a handler installed from C, which cannot be put back
                signal.signal(s, previous)
        self._previous.clear()
