"""Loading user rows (JSONL, parquet, datasets directories) and math_task over them."""

import json

import pytest

from packrl.tasks.data import load_task_rows, read_rows, split_rows
from packrl.tasks.math import math_accuracy, math_task

ROWS = [
    {"question": f"What is {i} + {i}?", "solution": str(2 * i), "level": i % 3} for i in range(10)
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_with_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    rows = load_task_rows(
        path,
        columns={"prompt": "question", "answer": "solution"},
        prompt_template="{prompt} (level {level})",
        system_prompt="Be brief.",
    )
    assert len(rows) == 10
    assert rows[3]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3 + 3? (level 0)"},
    ]
    assert rows[3]["answer"] == "6" and rows[3]["level"] == 0


def test_missing_column_and_bad_rows_are_named(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"row 0 has no column 'problem' \(mapped to 'prompt'"):
        load_task_rows(path, columns={"prompt": "problem"})
    with pytest.raises(ValueError, match="row 0 has no 'prompt' column"):
        load_task_rows(path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        read_rows(broken)
    with pytest.raises(ValueError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown format"):
        read_rows(write_jsonl(tmp_path / "x.csv", ROWS))
    bad_answer = write_jsonl(tmp_path / "bad.jsonl", [*ROWS[:5], {"question": "q", "solution": ""}])
    with pytest.raises(ValueError, match="row 5, column 'answer': expected a non-empty answer"):
        math_task(
            str(bad_answer),
            columns={"prompt": "question", "answer": "solution"},
            eval_path=str(bad_answer),
        )
    with pytest.raises(ValueError, match="prompt_template"):
        load_task_rows(path, columns={"prompt": "question"}, prompt_template="{prompt} {nope}")


def test_messages_rows_are_kept(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}]
    rows = load_task_rows(write_jsonl(tmp_path / "chat.jsonl", chat))
    assert rows[0]["messages"] == chat[0]["messages"]
    bad = [{"messages": "2+2?", "answer": "4"}]
    with pytest.raises(ValueError, match="column 'messages'"):
        load_task_rows(write_jsonl(tmp_path / "bad.jsonl", bad))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_rows(path) == ROWS


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}
    )
    d.save_to_disk(str(tmp_path / "ds"))
    assert read_rows(tmp_path / "ds") == ROWS
    assert read_rows(tmp_path / "ds", split="test") == ROWS[:2]
    with pytest.raises(ValueError, match="split 'dev' not found"):
        read_rows(tmp_path / "ds", split="dev")


def test_split_rows_is_disjoint_and_seeded():
    rows = [{"i": i} for i in range(50)]
    train, held = split_rows(rows, 10, seed=0)
    assert len(train) == 40 and len(held) == 10
    assert not {r["i"] for r in train} & {r["i"] for r in held}
    assert split_rows(rows, 10, seed=0) == (train, held)
    with pytest.raises(ValueError, match="n_eval=50"):
        split_rows(rows, 50, seed=0)


def test_math_task_over_a_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    task = math_task(str(path), columns={"prompt": "question", "answer": "solution"}, n_eval=3)
    assert len(task.train) == 7 and len(task.eval) == 3
    row = task.train[0]
    assert "\\boxed{}" in row["messages"][-1]["content"]
    assert task.accuracy_func is math_accuracy
    got = math_accuracy(
        prompts=[row["messages"]] * 2,
        completions=[f"\\boxed{{{row['answer']}}}", "\\boxed{-1}"],
        answer=[row["answer"]] * 2,
    )
    assert got == [1.0, 0.0]
