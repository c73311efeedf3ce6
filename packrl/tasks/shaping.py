"""Optional format and shaping rewards (TRL convention; add them to a task's reward list).

- ``think_answer_format``: 1.0 when the completion is exactly ``<think>...</think>`` then
  ``<answer>...</answer>``, with nothing but whitespace after it (trailing junk fails), and
  aware of chat templates that already put ``<think>`` in the prompt.
- ``soft_overlong_penalty``: DAPO's soft penalty in [-1, 0] as a completion nears and passes
  the length limit.
- ``group_length_penalty``: in [-1, 0], the longest completion of each group (same prompt)
  gets -1 and the shortest 0.

Lengths are token counts when the caller passes ``completion_ids`` (one id list per
completion, as TRL does), else characters. Every value is computed in floats and clamped
to its range, so no length ever wraps around into a bonus.

To set arguments from a config, give the reward as a mapping, e.g.
``{path: packrl.tasks.shaping.soft_overlong_penalty, max_tokens: 512, buffer_tokens: 128}``
(see ``packrl.rewards.resolve_reward_funcs``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from packrl.tasks.base import completion_text

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_OPEN_THINK = re.compile(r"\s*<think>")
_REST = re.compile(r"(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def prompt_opens_think(prompt: Any) -> bool:
    """True if the prompt ends inside a ``<think>`` block (an assistant prefill ending in
    ``<think>``), so the completion starts with the thinking itself."""
    if isinstance(prompt, str):
        return prompt.rstrip().endswith("<think>")
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        last = prompt[-1]
        return last.get("role") == "assistant" and str(last.get("content", "")).rstrip().endswith(
            "<think>"
        )
    return False


def format_ok(completion: str, think_opened: bool = False) -> bool:
    """``<think>T</think> <answer>A</answer>`` and nothing after it; T and A non-empty and free
    of further tags. With ``think_opened`` the leading ``<think>`` is in the prompt."""
    text = completion
    if not think_opened:
        m = _OPEN_THINK.match(text)
        if m is None:
            return False
        text = text[m.end() :]
    m = _REST.fullmatch(text)
    if m is None:
        return False
    thinking, answer = m.groups()
    if any(tag in part for part in (thinking, answer) for tag in _TAGS):
        return False
    return bool(thinking.strip()) and bool(answer.strip())


def think_answer_format(
    completions: Sequence[str],
    prompts: Sequence[Any] | None = None,
    think_in_prompt: bool | None = None,
    **kwargs: Any,
) -> list[float]:
    """Reward: 1.0 for a well-formed ``<think>``/``<answer>`` completion, else 0.0.

    Args:
        think_in_prompt: True for chat templates that append ``<think>`` to the generation
            prompt (the completion must then not open it again); None: detect it from an
            assistant prefill ending in ``<think>``.
    """
    out = []
    for i, completion in enumerate(completions):
        if think_in_prompt is None:
            opened = prompts is not None and prompt_opens_think(prompts[i])
        else:
            opened = think_in_prompt
        out.append(float(format_ok(completion_text(completion), opened)))
    return out


def _lengths(
    completions: Sequence[str], completion_ids: Sequence[Sequence[int]] | None
) -> list[int]:
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]  # characters: no token ids given


def soft_overlong_penalty(
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]] | None = None,
    max_tokens: int = 1024,
    buffer_tokens: int = 256,
    **kwargs: Any,
) -> list[float]:
    """Reward in [-1, 0]: 0 up to ``max_tokens - buffer_tokens``, then falling linearly to -1
    at ``max_tokens``, and -1 beyond (DAPO's soft overlong punishment)."""
    if not 0 < buffer_tokens <= max_tokens:
        raise ValueError(
            f"soft_overlong_penalty: need 0 < buffer_tokens <= max_tokens, got "
            f"buffer_tokens={buffer_tokens}, max_tokens={max_tokens}"
        )
    start = max_tokens - buffer_tokens
    return [
        max(-1.0, min(0.0, (start - float(n)) / buffer_tokens))
        for n in _lengths(completions, completion_ids)
    ]


def group_length_penalty(
    completions: Sequence[str],
    prompts: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Reward in [-1, 0] within each group of completions of the same prompt:
    ``-(length - shortest) / (longest - shortest)``; 0 when all have the same length."""
    lengths = _lengths(completions, completion_ids)
    keys = [json.dumps(p, sort_keys=True, default=str) for p in prompts]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    out = [0.0] * len(completions)
    for members in groups.values():
        lo = min(lengths[i] for i in members)
        hi = max(lengths[i] for i in members)
        if hi > lo:
            for i in members:
                out[i] = -float(lengths[i] - lo) / float(hi - lo)
    return out
