"""A reward for the recipe tests, loaded by dotted path (`rewards.reward_funcs=[...]`).

Arithmetic accuracy is often the same for all of a handful of short samples, which gives
zero advantages and no update. This reward differs between almost any two texts, so every
tiny test step really changes the weights, and resuming has something to get wrong.
"""


def distinct_chars(completions: list, **kwargs) -> list[float]:
    """Number of distinct characters in the completion, divided by 10. Completions come in
    TRL's conversational form, as a reward written for TRL reads them."""
    return [len(set(c[0]["content"])) / 10.0 for c in completions]
