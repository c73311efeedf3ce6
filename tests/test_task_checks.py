"""Start-up checks of task rows: a row that cannot be trained on is found before step 1."""

import logging

import pytest

from packrl.tasks.base import Task
from packrl.tasks.checks import TaskDataError, check_task_rows


def _row(text: str, answer: str = "1") -> dict:
    return {"messages": [{"role": "user", "content": text}], "answer": answer}


def _task(train, eval_rows=(), validate_rows=None) -> Task:
    return Task(
        name="toy",
        train=list(train),
        eval=list(eval_rows),
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        validate_rows=validate_rows,
    )


def words(row) -> int:  # a stand-in tokenizer: one token per word, so lengths are exact
    return len(row["messages"][-1]["content"].split())


def test_a_prompt_too_long_for_a_row_is_named_at_start():
    task = _task([_row("short prompt"), _row("w " * 100), _row("also short")])
    with pytest.raises(TaskDataError) as err:
        check_task_rows(task, words, max_new_tokens=16, row_len=64, prompts_per_step=2)
    msg = str(err.value)
    assert "task 'toy': 1 train rows do not fit" in msg and "train row 1 ('w w w" in msg
    assert (
        "100 prompt tokens" in msg
        and "packing.row_len to at least 116" in msg
        and "packing.long_prompts: skip" in msg
    )


def test_skip_drops_long_rows_with_one_warning(caplog):
    task = _task([_row("short prompt"), _row("w " * 100), _row("w " * 49), _row("w " * 48)])
    with caplog.at_level(logging.WARNING, logger="packrl.tasks.checks"):
        out = check_task_rows(
            task, words, max_new_tokens=16, row_len=64, prompts_per_step=2, long_prompts="skip"
        )
    assert [words(r) for r in out.train] == [2, 48]  # 48 + 16 = 64 fits exactly; 49 does not
    assert caplog.text.count("skipped 2 rows") == 1


def test_eval_rows_are_not_held_to_row_len():
    task = _task([_row("a b")], eval_rows=[_row("w " * 100)])
    assert check_task_rows(task, words, max_new_tokens=8, row_len=32, prompts_per_step=1) is task


def test_unparseable_gold_answers_are_found_at_start():
    """math-verify cannot read `\frac{`: every sample of that row would score 0 silently."""
    from packrl.tasks.math import gold_answers_parse

    train = [_row("a", "1"), _row("b", "\\frac{"), _row("c", "\\frac{1}{2}")]
    task = _task(train, [_row("d", "\\frac{"), _row("e", "x = 2")], gold_answers_parse)
    with pytest.raises(TaskDataError) as err:
        check_task_rows(task, words, max_new_tokens=8, row_len=32, prompts_per_step=1)
    msg = str(err.value)
    assert "task 'toy', train row 1: gold answer '\\\\frac{' cannot be graded" in msg
    assert "eval row 0" in msg and "train row 0" not in msg and "train row 2" not in msg
    assert "eval row 1" not in msg


def test_fewer_rows_than_prompts_per_step_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="packrl.tasks.checks"):
        check_task_rows(_task([_row("a")]), words, max_new_tokens=8, row_len=32, prompts_per_step=4)
    assert "1 training rows, fewer than grpo.prompts_per_step=4: rows repeat" in caplog.text


def test_real_tokenizer_on_the_arithmetic_task(smollm2_tokenizer):
    from packrl.tasks.arithmetic import arithmetic_task

    task = arithmetic_task(n_train=50, n_eval=5)
    length = lambda row: len(  # noqa: E731
        smollm2_tokenizer.tokenize_messages(row["messages"], add_generation_prompt=True)
    )
    longest = max(length(r) for r in task.train)
    ok = check_task_rows(task, length, max_new_tokens=64, row_len=longest + 64, prompts_per_step=4)
    assert ok is task
    with pytest.raises(TaskDataError, match=f"Raise packing.row_len to at least {longest + 64}"):
        check_task_rows(task, length, max_new_tokens=64, row_len=longest + 63, prompts_per_step=4)
