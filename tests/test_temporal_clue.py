"""Temporal Clue: generator records, determinism, grader, files, task adapter, shipped sets.

The independent uniqueness re-check lives in test_temporal_clue_check.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from packrl.tasks.temporal_clue import (
    GENERATOR_VERSION,
    SCHEMA_VERSION,
    PuzzleFileError,
    World,
    audit,
    generate_puzzle,
    grade,
    holds,
    normalize,
    read_puzzles,
    temporal_clue_format_reward,
    temporal_clue_reward,
    temporal_clue_task,
    write_puzzles,
)
from packrl.tasks.temporal_clue.files import dumps_record

ROOT = Path(__file__).resolve().parents[1]
PUZZLES = ROOT / "puzzles"
SPLITS = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl",
          "large_train": "large_train.jsonl", "large_validation": "large_validation.jsonl",
          "large_test": "large_test.jsonl"}  # fmt: skip


# --- generator -----------------------------------------------------------------------------
def test_same_seed_same_bytes_and_seeds_differ():
    a, b = generate_puzzle(21, 3), generate_puzzle(21, 3)
    assert dumps_record(a) == dumps_record(b)
    assert generate_puzzle(22, 3)["prompt"] != a["prompt"]


def test_record_fields_and_clues_true():
    rec = generate_puzzle(5, 4)
    assert rec["generator_version"] == GENERATOR_VERSION
    assert rec["seed"] == 5 and rec["players"] == 4
    # self-describing: schema, rules, map convention, the knobs
    assert rec["schema_version"] == SCHEMA_VERSION
    assert rec["rules"]["motives"] == "all_different" and rec["rules"]["victim"] == "not_tracked"
    assert rec["map"]["cells"] == rec["scenario"]["rooms"] and "row-major" in rec["map"]["convention"]  # fmt: skip
    assert rec["config"]["suspects"] == 5 and rec["id"] == "tc-p4-5"
    assert rec["num_clues"] == len(rec["clues"]) == rec["difficulty"]["clues"]
    assert set(rec["difficulty"]) >= {"clues", "questions", "conflicts", "branches", "families"}
    assert rec["sizes"]["suspects"] == len(rec["scenario"]["suspects"])
    world = World.from_dict(rec["scenario"])
    for i, c in enumerate(rec["clues"]):
        assert holds(c, world), c["text"]
        assert f"{i + 1}. {c['text']}" in rec["prompt"]
    for q in rec["questions"]:
        assert f"{q['letter']}. {q['text']}" in rec["prompt"]
    # the main questions come first; nothing given away is asked
    kinds = [q["kind"] for q in rec["questions"]]
    assert kinds[:5] == ["who", "weapon", "room", "time", "why"]
    assert "time" not in [q["kind"] for q in generate_puzzle(5, 2)["questions"]]


def test_cli_output_is_byte_identical_across_worker_counts(tmp_path):
    """The balanced writer draws candidates in rounds and keeps a choice of them; neither
    the rounds nor the choice may depend on how many processes drew them."""
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.jsonl"
        cmd = [sys.executable, str(ROOT / "tools/generate_puzzles.py"), "--n", "12",
               "--seed", "9", "--players", "1-2", "--workers", str(workers), "--out", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, timeout=600)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    recs = [json.loads(x) for x in outs[0].splitlines()]
    assert [r["players"] for r in recs] == [1, 2] * 6
    assert len({r["seed"] for r in recs}) == 12
    assert all(9_000_000 <= r["seed"] < 9_000_000 + 12 * 5 for r in recs)
    for kind, r in audit(recs).items():  # kept within the default 4 points, checked at 5
        assert r["worst_excess"] <= 0.05, (kind, r["worst"], r["worst_excess"])
    # unbalanced: candidates 0..n-1, as drawn
    out = tmp_path / "off.jsonl"
    cmd = [sys.executable, str(ROOT / "tools/generate_puzzles.py"), "--n", "4", "--seed", "9",
           "--players", "1-2", "--workers", "1", "--shortcut-bound", "off", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, timeout=300)
    assert [json.loads(x)["seed"] for x in out.read_text().splitlines()] == [9_000_000 + i for i in range(4)]  # fmt: skip


def test_cli_rejects_bad_players(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("generate_puzzles", ROOT / "tools/generate_puzzles.py")  # fmt: skip
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.parse_players("1-3,5") == [1, 2, 3, 5]
    with pytest.raises(SystemExit):
        cli.main(["--players", "0-11", "--out", str(tmp_path / "x.jsonl")])
    assert "--players must be within 1-10" in capsys.readouterr().err


# --- grader --------------------------------------------------------------------------------
KEY = {"A": "Mrs. White", "B": "Lead Pipe", "C": "Dining Room", "D": "11:45 PM", "E": "Greed"}


def test_perfect_sheet_with_reasoning_first():
    sheet = (
        "Let me think. A. is probably Colonel Mustard...\nB: no wait.\n\n"
        "Final answers:\nA. Mrs. White\nB. Lead Pipe\nC. Dining Room\nD. 11:45 PM\nE. Greed\n"
    )
    g = grade(sheet, KEY)
    assert g.score == 1.0 and all(d["correct"] for d in g.details)


def test_repeated_letters_last_one_wins():
    assert grade("A. Mrs. White\nA. Mr. Green", {"A": "Mrs. White"}).score == 0.0
    assert grade("A. Mr. Green\nA. Mrs. White", {"A": "Mrs. White"}).score == 1.0


def test_case_articles_punctuation_and_markdown():
    sheet = (
        "a) mrs white\n**B.** the lead pipe\nc: The Dining Room.\n- D. 11:45 pm\n  e. GREED (money)"
    )
    g = grade(sheet, KEY)
    assert [d["correct"] for d in g.details] == [True] * 5


@pytest.mark.parametrize(
    "given,ok",
    [("11:45 PM", True), ("11:45pm", True), ("11:45 p.m.", True), ("23:45", True),
     ("at 11:45 PM", True), ("11.45 PM", True), ("11:45 AM", False), ("11:15 PM", False),
     ("11 PM", False), ("1145", False)],
)  # fmt: skip
def test_time_answers(given, ok):
    assert (grade(f"D. {given}", {"D": "11:45 PM"}).score == 1.0) is ok
    assert normalize("12:00 AM") == normalize("0:00") == "12:00am"


def test_missing_wrong_and_hedged_answers_get_partial_credit():
    g = grade("A. Mrs. White\nB. Lead Pipe or Rope\nC. Kitchen\nE. greed", KEY)
    assert g.score == pytest.approx(2 / 5)
    by = {d["letter"]: d for d in g.details}
    assert by["D"]["given"] is None and not by["D"]["correct"]
    assert by["B"]["given"] == "Lead Pipe or Rope" and not by["B"]["correct"]
    assert grade("", KEY).score == 0.0
    assert grade("F. Mrs. White", {"A": "Mrs. White"}).score == 0.0  # unasked letter ignored


def test_reward_functions_follow_trl_convention():
    sol = [{"A": "Rope", "B": "Hall"}] * 3
    comps = ["A. Rope\nB. Hall", "A. rope", [{"role": "assistant", "content": "A. Knife\nB. Hall"}]]
    prompts = [[{"role": "user", "content": "p"}]] * 3
    r = temporal_clue_reward(prompts=prompts, completions=comps, solution=sol, id=["x"] * 3)
    assert r == [1.0, 0.5, 0.5]
    assert temporal_clue_format_reward(prompts=prompts, completions=comps, solution=sol) == [1.0, 0.5, 1.0]  # fmt: skip
    with pytest.raises(ValueError):
        temporal_clue_reward(completions=comps, solution=sol[:2])


# --- files ---------------------------------------------------------------------------------
def test_public_json_format_is_read(tmp_path):
    public = [
        {"num_clues": 5, "prompt": "Who?", "solution": {"A": "Miss Scarlett", "B": "Rope"}},
        {"num_clues": 7, "prompt": "When?", "solution": {"A": "9:00 PM"}},
    ]
    path = tmp_path / "puzzles.json"
    path.write_text(json.dumps(public))
    recs = read_puzzles(path)
    assert recs == public
    task = temporal_clue_task(train_path=str(path), eval_path=str(path))
    assert task.train[0]["messages"] == [{"role": "user", "content": "Who?"}]
    assert task.train[1]["solution"] == {"A": "9:00 PM"}


@pytest.mark.parametrize(
    "records,needle",
    [([{"prompt": "p", "solution": {"A": "x"}}, {"solution": {"A": "x"}}], "record 1 (line 2): field 'prompt'"),
     ([{"prompt": "p", "solution": ["x"]}], "record 0 (line 1): field 'solution'"),
     ([{"prompt": "p", "solution": {"AB": "x"}}], "field 'solution' has key 'AB'"),
     ([{"prompt": "p", "solution": {"A": 3}}], "field 'solution.A'"),
     ([{"prompt": "p", "solution": {"A": "x"}, "num_clues": -1}], "field 'num_clues'")],
)  # fmt: skip
def test_malformed_jsonl_names_record_and_field(tmp_path, records, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(PuzzleFileError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_puzzles(path)


def test_malformed_files(tmp_path):
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text('{"prompt": "p", "solution": {"A": "x"}}\n{oops\n')
    with pytest.raises(PuzzleFileError, match=r"record 1 \(line 2\): not valid JSON"):
        read_puzzles(bad_json)
    public = tmp_path / "b.json"
    public.write_text(json.dumps([{"prompt": "p", "solution": {"A": "x"}}, "nope"]))
    with pytest.raises(PuzzleFileError, match="record 1: expected a JSON object"):
        read_puzzles(public)
    (tmp_path / "c.jsonl").write_text("\n")
    with pytest.raises(PuzzleFileError, match="no puzzles"):
        read_puzzles(tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError, match="generate_puzzles.py"):
        read_puzzles(tmp_path / "missing.jsonl")


def test_write_read_round_trip(tmp_path):
    recs = [generate_puzzle(1, 1), generate_puzzle(2, 1)]
    assert write_puzzles(recs, tmp_path / "x.jsonl") == 2
    assert read_puzzles(tmp_path / "x.jsonl") == recs


# --- shipped sets --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    return {split: read_puzzles(PUZZLES / name) for split, name in SPLITS.items()}


def test_shipped_sets_sizes_difficulties_and_disjointness(shipped):
    assert len(shipped["validation"]) == len(shipped["test"]) == 64
    assert 100 <= len(shipped["train"]) <= 1000
    for split, recs in shipped.items():
        levels = {7, 8, 9} if split.startswith("large") else {1, 2, 3, 4, 5, 6}
        assert {r["players"] for r in recs} == levels, split
        assert all(r["generator_version"] == GENERATOR_VERSION for r in recs), split
        assert all(r["schema_version"] == SCHEMA_VERSION for r in recs), split
    for key in ("id", "prompt"):
        seen = {}
        for split, recs in shipped.items():
            for r in recs:
                assert r[key] not in seen, f"{r['id']} in both {seen.get(r[key])} and {split}"
                seen[r[key]] = split


def test_shipped_sets_have_no_answer_shortcuts(shipped):
    """Issue 11's target, on every shipped set (all written with the default
    --shortcut-bound 4): no name heuristic beats chance by more than 5 points on any
    question kind."""
    for split in SPLITS:
        for kind, r in audit(shipped[split]).items():
            assert r["worst_excess"] <= 0.05, (split, kind, r["worst"], r["worst_excess"])


def test_shipped_clues_are_true_of_their_scenarios(shipped):
    for recs in shipped.values():
        for r in recs:
            world = World.from_dict(r["scenario"])
            assert all(holds(c, world) for c in r["clues"]), r["id"]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_sets_are_kept_under_their_version(version):
    """The sets shipped by generators 1-3 keep their meaning under puzzles/v1/, v2/, v3/."""
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        old = read_puzzles(PUZZLES / f"v{version}" / name)
        assert {r["generator_version"] for r in old} == {f"packrl-temporal-clue/{version}"}
        assert {r["players"] for r in old} == {1, 2, 3, 4, 5, 6}


def test_shipped_puzzles_regenerate_from_their_seeds(shipped):
    """The documented command reproduces the files: spot-check the first easy records."""
    for split in ("validation", "test", "train"):
        for rec in shipped[split][:2]:
            assert dumps_record(generate_puzzle(rec["seed"], rec["players"])) == dumps_record(rec)
    # and the cheapest large puzzle of level 7 (a few CPU seconds)
    rec = min((r for r in shipped["large_validation"] if r["players"] == 7),
              key=lambda r: r["generation"]["solves_total"])  # fmt: skip
    assert dumps_record(generate_puzzle(rec["seed"], 7)) == dumps_record(rec)


def test_easy_prompts_fit_a_small_context(shipped, smollm2_tokenizer):
    task = temporal_clue_task(players=[1, 2])
    lengths = [len(smollm2_tokenizer.tokenize_messages(r["messages"])) for r in task.eval]
    assert max(lengths) < 1500, max(lengths)


def test_task_adapter_from_config():
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create({
        "_component_": "packrl.tasks.temporal_clue.temporal_clue_task",
        "train_path": "puzzles/train.jsonl", "eval_path": "puzzles/validation.jsonl",
        "players": [1, 2], "max_eval": 8, "format_weight": 0.2,
    })  # fmt: skip
    task = config.instantiate(cfg)
    assert task.name == "temporal_clue" and len(task.eval) == 8
    assert {r["players"] for r in task.train} == {1, 2}
    assert task.reward_weights == [1.0, 0.2] and task.accuracy_func is temporal_clue_reward
    row = task.eval[0]
    perfect = "\n".join(f"{k}. {v}" for k, v in row["solution"].items())
    cols = {"solution": [row["solution"]] * 2, "id": [row["id"]] * 2}
    assert task.accuracy_func(prompts=[row["messages"]] * 2, completions=[perfect, ""], **cols) == [1.0, 0.0]  # fmt: skip
    with pytest.raises(ValueError, match="players"):
        temporal_clue_task(players=[9])
