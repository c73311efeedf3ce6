"""Preemption: turn a scheduler's signal into "finish this step, checkpoint, exit".

SLURM sends SIGTERM at preemption and at the time limit (and, with ``--signal=B:USR1@120``,
SIGUSR1 two minutes before). The default action kills the process mid-step and loses
everything since the last checkpoint. Inside ``PreemptionGuard`` the first such signal only
sets a flag; the recipe checks it at its safe point (after an optimizer step), writes a
checkpoint and exits with ``PREEMPTED_EXIT_CODE``. Further signals are ignored: under
torchrun a worker may get the signal twice (from the scheduler and from torchrun, which
forwards it and waits 30 s before SIGKILL). Ctrl-C (SIGINT) still stops the run at once.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

from packrl.training.distributed import all_reduce

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry" (resume).
PREEMPTED_EXIT_CODE = 75


class PreemptionGuard:
    """Catches ``signals`` (names such as "SIGTERM") while active (a context manager).

    Raises:
        ValueError: an unknown signal name.
    """

    def __init__(self, signals: list[str]) -> None:
        self.signals: list[signal.Signals] = []
        for name in signals:
            try:
                self.signals.append(signal.Signals[name])
            except KeyError:
                raise ValueError(f"unknown signal {name!r}; use names such as SIGTERM") from None
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signal.Signals(signum).name
        print(f"packrl: received {self.received}; finishing this step, then saving a checkpoint",
              flush=True)  # fmt: skip

    def __enter__(self) -> PreemptionGuard:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def should_stop(self, device: torch.device) -> bool:
        """Whether any rank was signalled (a collective under torchrun: every rank calls it
        at the same point, so all ranks stop after the same step)."""
        (flag,) = all_reduce([1.0 if self.received else 0.0], device, op="max")
        return flag > 0
