"""Scoring completions with a task's reward functions, without letting them hurt training.

Reward functions follow TRL's convention (see ``packrl.tasks.base``). ``RewardScorer`` calls
them all at once, each in its own daemon thread, under one shared deadline:

- a function that raises anything (``SystemExit`` included) on the batch is retried sample
  by sample; samples that still raise score 0, are counted in ``RewardScores.failed``, and
  the function name and a traceback summary are logged;
- a function that is still running at the deadline scores 0 for the whole batch (logged);
  its thread is abandoned, so training never waits on it;
- ``None`` ("does not apply") scores 0; NaN, inf or a non-number counts as a failure;
- a function that returns the wrong number of values, or fails every sample of
  ``max_failed_batches`` batches in a row, is broken: ``RewardFunctionError`` stops the run
  with its name, rather than letting it fail every sample of a whole run.

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
        failed: name -> [N] bool, the samples whose reward failed (raised, timed out, bad
            value); they score 0 for that function.
    """

    total: torch.Tensor
    per_func: dict[str, torch.Tensor] = field(default_factory=dict)
    failed: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def failures(self) -> dict[str, int]:
        """name -> number of samples whose reward failed."""
        return {name: int(mask.sum()) for name, mask in self.failed.items()}


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


class RewardFunctionError(RuntimeError):
    """A reward function is broken, not unlucky: it returned the wrong number of values, or
    failed on every sample of ``max_failed_batches`` batches in a row. The run stops."""


class _Call:
    """One reward function applied to the batch, in a daemon thread (abandoned on timeout).

    Anything the function raises, ``SystemExit`` included, costs the samples it was raised on
    and is counted: a reward's thread must never die silently.
    """

    def __init__(self, fn: Callable, kwargs: dict[str, Any], n: int, name: str) -> None:
        self.fn, self.kwargs, self.n, self.name = fn, kwargs, n, name
        self.values: list[float] = [0.0] * n
        self.failed: list[bool] = [True] * n  # until the thread says otherwise
        self.error: str | None = None  # the last failure, for logs and RewardFunctionError
        self.bad_length: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"reward-{name}")
        self.thread.start()

    def _run(self) -> None:
        try:
            out = list(self.fn(**self.kwargs))
        except BaseException as e:  # noqa: BLE001 - a reward bug costs samples, not the run
            self.error = _summary(e)
            log.warning("reward %s raised on the batch (%s); retrying sample by sample",
                        self.name, self.error)  # fmt: skip
        else:
            if len(out) != self.n:
                self.bad_length = f"returned {len(out)} values for {self.n} completions"
                return
            self.values, self.failed = self._check(out)
            return
        values, failed = [0.0] * self.n, [True] * self.n
        for i in range(self.n):
            one = {k: v[i : i + 1] for k, v in self.kwargs.items()}
            try:
                out = list(self.fn(**one))
            except BaseException as e:  # noqa: BLE001
                self.error = _summary(e)
                log.warning("reward %s failed on sample %d, scored 0: %s", self.name, i, self.error)
                continue
            if len(out) != 1:
                self.bad_length = f"returned {len(out)} values for 1 completion"
                return
            (values[i],), (failed[i],) = self._check(out)
        self.values, self.failed = values, failed

    def _check(self, out: list[Any]) -> tuple[list[float], list[bool]]:
        values, failed = [], []
        for v in out:
            try:
                v = 0.0 if v is None else float(v)
            except (TypeError, ValueError):
                v = float("nan")
            bad = not math.isfinite(v)
            values.append(0.0 if bad else v)
            failed.append(bad)
        if any(failed):
            self.error = f"returned {sum(failed)} non-finite or non-numeric values"
            log.warning("reward %s %s, scored 0", self.name, self.error)
        return values, failed


def _summary(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno} in {tb[-1].name})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


@dataclass
class TrainerState:
    """What TRL passes reward functions as ``trainer_state``: where training is."""

    global_step: int = 0  # optimizer steps taken before this rollout
    max_steps: int = 0


class RewardScorer:
    """Computes weighted rewards for a batch of completions.

    A sample whose reward fails (raises anything, times out, returns NaN/inf or a
    non-number) scores 0 for that function and is counted in ``RewardScores.failed``. A
    function that is broken rather than unlucky raises ``RewardFunctionError`` naming it: one
    that returns the wrong number of values, or that fails on every sample of
    ``max_failed_batches`` calls in a row.

    Args:
        reward_funcs: functions in TRL's convention, or specs (see ``resolve_reward_funcs``).
        weights: one weight per function (default: all 1.0).
        max_workers: worker processes for process-based rewards (default: one per core).
        timeout_s: deadline for all functions on one batch; slower ones score 0.
        max_failed_batches: stop after a function failed every sample of this many calls in
            a row (None: never).
    """

    def __init__(
        self,
        reward_funcs: Sequence[str | Callable | Mapping[str, Any]],
        weights: Sequence[float] | None = None,
        max_workers: int | None = None,
        timeout_s: float = 120.0,
        max_failed_batches: int | None = 3,
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
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_failed_batches is not None and max_failed_batches < 1:
            raise ValueError(f"max_failed_batches must be >= 1 or null, got {max_failed_batches}")
        self.names = _unique_names([func_name(f) for f in self.reward_funcs])
        self.timeout_s = timeout_s
        self.max_failed_batches = max_failed_batches
        self._failed_in_a_row = dict.fromkeys(self.names, 0)
        if max_workers is not None:
            shared_pool(max_workers)

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> RewardScores:
        """Scores N completions.

        Args:
            prompts: N prompts (chats), aligned with ``completions``.
            completions: N completions (text, or TRL's ``[{"role": "assistant", ...}]``).
            columns: further keyword arguments, each a list of N values (dataset columns,
                ``completion_ids``); ``trainer_state`` is passed as it is.

        Raises:
            RewardFunctionError: a function is broken (see the class docstring).
        """
        n = len(completions)
        kwargs: dict[str, Any] = {"prompts": list(prompts), "completions": list(completions)}
        for key, values in (columns or {}).items():
            if key in kwargs:
                continue  # the recipe's own prompts/completions win over a column of that name
            if key == "trainer_state":
                kwargs[key] = values
                continue
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
            kwargs[key] = list(values)
        if len(kwargs["prompts"]) != n:
            raise ValueError(f"{len(kwargs['prompts'])} prompts for {n} completions")

        end = time.monotonic() + self.timeout_s
        calls = [
            _Call(fn, {k: _copy(v) for k, v in kwargs.items()}, n, name)  # fns may mutate
            for fn, name in zip(self.reward_funcs, self.names, strict=True)
        ]
        total = torch.zeros(n)
        per_func, failed = {}, {}
        for call, w in zip(calls, self.weights, strict=True):
            call.thread.join(timeout=max(0.0, end - time.monotonic()))
            if call.thread.is_alive():
                call.error = f"did not finish within {self.timeout_s:.1f} s"
                log.warning("reward %s %s; its %d samples score 0", call.name, call.error, n)
                values, bad = [0.0] * n, [True] * n
            elif call.bad_length is not None:
                raise RewardFunctionError(
                    f"reward function {call.name} {call.bad_length}: it must return one value "
                    "per completion (None for 'does not apply'). This is a bug in the function."
                )
            else:
                values, bad = call.values, call.failed
            per_func[call.name] = torch.tensor(values, dtype=torch.float32)
            failed[call.name] = torch.tensor(bad, dtype=torch.bool)
            total += w * per_func[call.name]
            self._count_failed_batch(call.name, n > 0 and all(bad), call.error)
        return RewardScores(total=total, per_func=per_func, failed=failed)

    def _count_failed_batch(self, name: str, all_failed: bool, error: str | None) -> None:
        self._failed_in_a_row[name] = self._failed_in_a_row[name] + 1 if all_failed else 0
        limit = self.max_failed_batches
        if limit is not None and self._failed_in_a_row[name] >= limit:
            raise RewardFunctionError(
                f"reward function {name} failed on every sample of {limit} batches in a row "
                f"(last error: {error}). This is a bug in the function or its data, not bad "
                "luck; fix it, or raise rewards.max_failed_batches to keep going."
            )


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
