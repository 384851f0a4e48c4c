"""Preemption: SIGTERM (TPU maintenance, spot / preemptible VMs, SLURM's notice) asks the run to stop at the
next optimizer-step boundary and save there, as exactly as any saved step; a second SIGTERM, or a SIGINT
after it, exits at once (exit code 128 + signal) without finishing the step or the save in flight, whose
directory Orbax never commits (resume skips it).

    preemption = Preemption().install()
    try:
        for step ...:
            ...
            if preemption.requested()[0]: save and stop
    finally:
        preemption.uninstall()

On a multi-process run every process must stop at the same step: `requested()` is true on all of them as
soon as one received the signal (the processes agree once per step, as they do for max_time).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)


class Preemption:
    """The SIGTERM handler of a run, from `install()` to `uninstall()` (main thread only; elsewhere it is inert)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.getsignal(signum)
            signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second request: no more waiting
            log.warning("second stop signal (%s): exiting now, without finishing the step", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        self.signum = signum
        signal.signal(signal.SIGINT, self._handle)  # after a SIGTERM, Ctrl-C exits at once too
        log.warning("%s received: saving at the end of this optimizer step, then stopping (send it again to exit "
                    "at once)", signal.Signals(signum).name)

    def requested(self, also: bool = False) -> tuple[bool, bool]:
        """(stop requested on any process, `also` on any process): one agreement of all processes per call."""
        flags = np.asarray([self.signum is not None, also])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flags = np.any(multihost_utils.process_allgather(flags), axis=0)
        return bool(flags[0]), bool(flags[1])
