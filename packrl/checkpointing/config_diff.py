"""What a resumed run's config changed, compared with the config saved in its checkpoint.

The rule (docs/checkpointing.md), applied to every dotted key that differs:

1. ``resume_from_checkpoint``, ``resume_allow_changed`` and ``overwrite`` are not compared:
   they say how to start, not what to train.
2. ``optimizer.*`` and ``lr_scheduler.*``: **the saved state wins.** ``load_checkpoint``
   restores the optimizer's param groups (lr, betas, eps, weight_decay) and the scheduler's
   state (base_lrs, step) over the freshly built ones, so a new value there is silently
   ignored, or, for arguments a scheduler does not save (the warmup and length of a
   ``LambdaLR`` such as torchtune's cosine schedule), applied to a schedule that is already
   part-way through. Either way it is not the run the config describes, so it is an error
   unless the key (or a dotted prefix of it) is listed in ``resume_allow_changed``; then the
   run continues with the saved state and a warning says so.
3. Every other key (``max_steps``, ``grpo.*``, ``task.*``, ``seed``, ...) takes effect from
   the resumed step on: it is listed in a warning.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ALLOW_KEY = "resume_allow_changed"
NOT_COMPARED = ("resume_from_checkpoint", ALLOW_KEY, "overwrite")
STATE_WINS = ("optimizer", "lr_scheduler")

# What a change to these keys does besides the obvious (recipes/grpo.py builds the scheduler
# with num_training_steps = max_steps * grpo.num_passes, and seeds data order and sampling).
NOTES = {
    "max_steps": "also the LR schedule's length, so the LR jumps to the new curve",
    "grpo.num_passes": "also the LR schedule's length, so the LR jumps to the new curve",
    "seed": "the data order and sampling seeds follow it: the rest of the run sees other "
    "prompts and samples than the saved run would have",
}


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


MISSING: Any = _Missing()


class ConfigChangeError(ValueError):
    """A resume changes keys whose new value the checkpoint's saved state overrides."""


@dataclass(frozen=True)
class Change:
    """One dotted key whose value differs; ``saved``/``new`` is MISSING where absent."""

    key: str
    saved: Any
    new: Any

    def __str__(self) -> str:
        note = f" ({NOTES[self.key]})" if self.key in NOTES else ""
        return f"{self.key}: {self.saved!r} -> {self.new!r}{note}"


@dataclass(frozen=True)
class ConfigDiff:
    """The changes of a resume, by the rule in this module's docstring."""

    state_wins: tuple[Change, ...]  # optimizer.*, lr_scheduler.*
    changed: tuple[Change, ...]  # everything else

    def __bool__(self) -> bool:
        return bool(self.state_wins or self.changed)

    def check(self, allowed: Iterable[str] = ()) -> str | None:
        """Raise ConfigChangeError for ``state_wins`` changes that ``allowed`` (the run's
        ``resume_allow_changed``: keys or dotted prefixes) does not list; return the warning
        to log for the rest, or None when nothing changed.

        Raises ValueError for an ``allowed`` entry outside optimizer.* / lr_scheduler.*.
        """
        allowed = list(allowed)
        for key in allowed:
            if key.split(".")[0] not in STATE_WINS:
                raise ValueError(
                    f"{ALLOW_KEY} lists {key!r}; it only takes keys under "
                    f"{' or '.join(p + '.' for p in STATE_WINS)} (other keys may change on "
                    "resume without it)"
                )
        refused = [c for c in self.state_wins if not _matches(c.key, allowed)]
        if refused:
            raise ConfigChangeError(
                "this resume changes keys whose new value the checkpoint overrides:\n"
                + "".join(f"  {c}\n" for c in refused)
                + "load_checkpoint restores the saved optimizer and LR-scheduler state, so "
                "these would be ignored (or bend a schedule that is already part-way "
                "through). Put the saved values back, start a fresh run (another output_dir, "
                f"or overwrite: true), or list them in {ALLOW_KEY} (e.g. {ALLOW_KEY}: "
                f"[{refused[0].key}]) to continue with the saved state."
            )
        lines = [f"  {c}\n" for c in self.changed]
        lines += [f"  {c} (allowed; the saved state is kept)\n" for c in self.state_wins]
        if not lines:
            return None
        return "resuming with a config that differs from the checkpoint's:\n" + "".join(lines)


def _matches(key: str, allowed: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"grpo": {"group_size": 8}}`` -> ``{"grpo.group_size": 8}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_changes(saved: dict, new: dict) -> ConfigDiff:
    """The dotted keys whose values differ between the config saved with a checkpoint and the
    resuming run's config (both plain, resolved dicts), classified by the module's rule."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    state_wins, changed = [], []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if key.split(".")[0] in NOT_COMPARED:
            continue
        before, after = old_flat.get(key, MISSING), new_flat.get(key, MISSING)
        if before is not MISSING and after is not MISSING and before == after:
            continue
        change = Change(key, before, after)
        (state_wins if key.split(".")[0] in STATE_WINS else changed).append(change)
    return ConfigDiff(tuple(state_wins), tuple(changed))
