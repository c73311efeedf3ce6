"""Scoring completions with a task's reward functions, without letting them hurt training.

Reward functions follow TRL's convention (see ``packrl.tasks.base``). ``RewardScorer`` calls
them all at once, each in its own daemon thread, under one shared deadline:

- a function that raises on the batch is retried sample by sample; samples that still raise
  score 0, and the function name and a traceback summary are logged;
- a function that is still running at the deadline scores 0 for the whole batch (logged);
  its thread is abandoned, so training never waits on it;
- ``None`` ("does not apply") scores 0; NaN or inf counts as a failure and scores 0.

Heavy reward work (math-verify, code sandboxes) runs in worker processes
(``packrl.execution.workers``, ``packrl.execution.sandbox``) sized to the machine.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from packrl.execution.workers import shared_pool
from packrl.tasks.base import RewardFn

log = logging.getLogger(__name__)


@dataclass
class RewardScores:
    """Rewards for N completions.

    Attributes:
        total: [N] float32, the weighted sum over reward functions.
        per_func: name -> [N] float32, each function's (unweighted) reward.
        failures: name -> number of samples whose reward failed (raised, timed out, bad value).
    """

    total: torch.Tensor
    per_func: dict[str, torch.Tensor] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)


def func_name(fn: Callable) -> str:
    """A short, stable name for logs: the function's (or partial's) name."""
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__name__", type(inner).__name__)


def resolve_reward_funcs(specs: Sequence[str | Callable | Mapping[str, Any]]) -> list[RewardFn]:
    """Turns specs into reward functions. A spec is a callable, a dotted path
    ("mypkg.rewards.my_reward"), or a mapping with a ``path`` and keyword arguments to bind
    (``{"path": "packrl.tasks.shaping.soft_overlong_penalty", "max_tokens": 512}``)."""
    funcs = []
    for spec in specs:
        if callable(spec):
            funcs.append(spec)
            continue
        if isinstance(spec, Mapping):
            kwargs = dict(spec)
            path = kwargs.pop("path", None)
            if path is None:
                raise ValueError(
                    f"reward function {dict(spec)!r}: a mapping needs a 'path' (dotted path "
                    "to the function) next to the arguments it binds"
                )
            funcs.append(functools.partial(resolve_reward_funcs([path])[0], **kwargs))
            continue
        if not isinstance(spec, str) or "." not in spec:
            raise ValueError(
                f"reward function {spec!r}: give a callable or a dotted path like "
                "'mypkg.rewards.my_reward'"
            )
        module_name, _, attr = spec.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(
                f"reward function {spec!r}: cannot import module {module_name!r} ({e}); "
                "check the path and that the module is on PYTHONPATH"
            ) from e
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise ValueError(
                f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}"
            )
        funcs.append(fn)
    return funcs


class _Call:
    """One reward function applied to the batch, in a daemon thread (abandoned on timeout)."""

    def __init__(self, fn: Callable, kwargs: dict[str, Any], n: int, name: str) -> None:
        self.fn, self.kwargs, self.n, self.name = fn, kwargs, n, name
        self.values: list[float] = [0.0] * n
        self.failed = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"reward-{name}")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.values, self.failed = self._check(self.fn(**self.kwargs), self.n)
            return
        except Exception as e:  # noqa: BLE001 - a reward bug costs samples, not the run
            log.warning(
                "reward %s raised on the batch (%s); retrying sample by sample",
                self.name,
                _summary(e),
            )
        values, failed = [0.0] * self.n, 0
        for i in range(self.n):
            one = {k: v[i : i + 1] for k, v in self.kwargs.items()}
            try:
                v, bad = self._check(self.fn(**one), 1)
                values[i], failed = v[0], failed + bad
            except Exception as e:  # noqa: BLE001
                failed += 1
                log.warning(
                    "reward %s failed on sample %d, scored 0: %s", self.name, i, _summary(e)
                )
        self.values, self.failed = values, failed

    def _check(self, out: Any, n: int) -> tuple[list[float], int]:
        out = list(out)
        if len(out) != n:
            raise ValueError(f"returned {len(out)} values for {n} completions")
        values, failed = [], 0
        for v in out:
            v = 0.0 if v is None else float(v)
            if not math.isfinite(v):
                failed += 1
                v = 0.0
            values.append(v)
        if failed:
            log.warning("reward %s returned %d non-finite values, scored 0", self.name, failed)
        return values, failed


def _summary(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno} in {tb[-1].name})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


class RewardScorer:
    """Computes weighted rewards for a batch of completions; never raises for a reward's fault.

    Args:
        reward_funcs: functions in TRL's convention, or specs (see ``resolve_reward_funcs``).
        weights: one weight per function (default: all 1.0).
        max_workers: worker processes for process-based rewards (default: one per core).
        timeout_s: deadline for all functions on one batch; slower ones score 0.
    """

    def __init__(
        self,
        reward_funcs: Sequence[str | Callable | Mapping[str, Any]],
        weights: Sequence[float] | None = None,
        max_workers: int | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.reward_funcs = resolve_reward_funcs(reward_funcs)
        if not self.reward_funcs:
            raise ValueError("RewardScorer needs at least one reward function")
        self.weights = [1.0] * len(self.reward_funcs) if weights is None else list(weights)
        if len(self.weights) != len(self.reward_funcs):
            raise ValueError(
                f"{len(self.reward_funcs)} reward functions but {len(self.weights)} weights; "
                "give one weight per function"
            )
        self.names = _unique_names([func_name(f) for f in self.reward_funcs])
        self.timeout_s = timeout_s
        if max_workers is not None:
            shared_pool(max_workers)

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        columns: dict[str, Sequence[Any]] | None = None,
    ) -> RewardScores:
        """Scores N completions.

        Args:
            prompts: N prompts (chats), aligned with ``completions``.
            completions: N decoded completions.
            columns: dataset columns, each a list of N values.
        """
        n = len(completions)
        kwargs: dict[str, list] = {"prompts": list(prompts), "completions": list(completions)}
        for key, values in (columns or {}).items():
            if key in kwargs:
                continue  # the recipe's own prompts/completions win over a column of that name
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
            kwargs[key] = list(values)
        if len(kwargs["prompts"]) != n:
            raise ValueError(f"{len(kwargs['prompts'])} prompts for {n} completions")

        end = time.monotonic() + self.timeout_s
        calls = [
            _Call(fn, {k: list(v) for k, v in kwargs.items()}, n, name)  # copies: fns may mutate
            for fn, name in zip(self.reward_funcs, self.names, strict=True)
        ]
        total = torch.zeros(n)
        per_func, failures = {}, {}
        for call, w in zip(calls, self.weights, strict=True):
            call.thread.join(timeout=max(0.0, end - time.monotonic()))
            if call.thread.is_alive():
                log.warning(
                    "reward %s did not finish within %.1f s; its %d samples score 0",
                    call.name,
                    self.timeout_s,
                    n,
                )
                values, failed = [0.0] * n, n
            else:
                values, failed = call.values, call.failed
            per_func[call.name] = torch.tensor(values, dtype=torch.float32)
            failures[call.name] = failed
            total += w * per_func[call.name]
        return RewardScores(total=total, per_func=per_func, failures=failures)


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
