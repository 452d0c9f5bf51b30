"""Stopping a training run cleanly on SIGTERM (SLURM's time limit, ``scancel``, a launcher stopping its ranks) and
SIGINT (Ctrl-C).

Without checkpoints a signal stops the run at once: the handler raises ``RunInterrupted``, the run's partial
outputs are removed on the way out (``outputs.previous_run_kept``) and the CLI prints one line. While a run can
checkpoint, the handler only records the signal (``StopSignals.deferred``); the loop asks ``stop_requested`` after
each optimizer step — collectively, so every rank stops after the same step even when only one of them got the
signal — saves a checkpoint and then raises ``RunInterrupted``. A second signal while one is pending stops at once
(Ctrl-C twice), leaving the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from folora_ds.distributed import comm

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """The run was stopped by a signal. ``exit_code`` is the shell's convention, 128 + the signal's number;
    ``checkpointed``: a checkpoint was saved at the stop (the message names it)."""

    def __init__(self, message: str, signal_number: int, *, checkpointed: bool = False) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number
        self.checkpointed = checkpointed


def signal_name(signal_number: int) -> str:
    return signal.Signals(signal_number).name


class StopSignals:
    """Handlers for ``STOP_SIGNALS`` while the context is open (main thread only; elsewhere Python cannot install
    them and the context does nothing). The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *_exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, signal_number: int, _frame) -> None:
        pending = self.received is not None
        self.received = signal_number
        if not self._deferring or pending:
            raise RunInterrupted(f"stopped by {signal_name(signal_number)}"
                                 + (" (a second signal: no checkpoint was saved)" if pending else ""), signal_number)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a first signal is only recorded (``stop_requested`` reports it at the next step boundary)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def stop_requested(self, device) -> int | None:
        """Collective: the signal any rank received (the largest number if several), or None. One small
        all-gather, so every rank takes the same decision after the same step."""
        if comm.world_size() == 1:
            return self.received
        received = max(comm.all_gather_counts(self.received or 0, device))
        return received or None
