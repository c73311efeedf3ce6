"""Temporal Clue knobs: presets, overrides from Python and the CLI, and impossible knobs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from packrl.tasks.temporal_clue import (
    PRESETS,
    World,
    generate_puzzle,
    holds,
    make_config,
    preset,
)

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("generate_puzzles", ROOT / "tools/generate_puzzles.py")  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_presets_keep_levels_1_to_6_and_reach_past_the_public_maximum():
    old = {1: (3, 3, 2, 2, 3, 0), 2: (3, 3, 2, 2, 4, 1), 3: (4, 4, 2, 3, 4, 1),
           4: (5, 4, 2, 3, 5, 2), 5: (5, 5, 3, 3, 5, 2), 6: (6, 6, 3, 3, 6, 3)}  # fmt: skip
    for level, (s, w, rows, cols, t, bonus) in old.items():
        c = preset(level)
        assert (c.suspects, c.weapons, c.rows, c.cols, c.times, c.bonus) == (s, w, rows, cols, t, bonus)  # fmt: skip
        assert c.rooms == rows * cols and c.motives == s and not c.victim_moves
    assert preset(1).given == ("time", "room") and preset(2).given == ("time",)
    public_max = preset(9)
    assert (public_max.suspects, public_max.weapons, public_max.rooms, public_max.times) == (10, 8, 16, 11)  # fmt: skip
    top = preset(max(PRESETS))
    assert (top.suspects, top.weapons, top.rooms, top.times) == (12, 10, 20, 12)
    assert all(c.check() is c for c in PRESETS.values())


def test_every_knob_reaches_the_puzzle():
    cfg = make_config(
        3, suspects=5, weapons=3, rooms=5, rows=2, cols=3, map="irregular", times=5, motives=3,
        victim_moves=True, bonus=2, bonus_kinds=("motive_suspect", "victim_room"),
        given=("weapon",), clue_weights={"fact": 1, "victim_at": 1, "same_motive": 1, "either": 1},
    )  # fmt: skip
    rec = generate_puzzle(5, config=cfg)
    sc = rec["scenario"]
    assert (len(sc["suspects"]), len(sc["weapons"]), len(sc["rooms"]), len(sc["times"])) == (5, 3, 5, 5)  # fmt: skip
    assert len(sc["motives"]) == 3 and len(set(sc["motive_of"].values())) == 3
    assert sc["cells"].count(None) == 1 and (sc["rows"], sc["cols"]) == (2, 3)
    assert len(sc["victim_rooms"]) == 5 and sc["victim_rooms"][sc["times"].index(sc["time"])] == sc["room"]  # fmt: skip
    kinds = [q["kind"] for q in rec["questions"]]
    assert kinds[:4] == ["who", "room", "time", "why"]
    assert sorted(kinds[4:]) == ["motive_suspect", "victim_room"]
    assert f"murdered with the {sc['weapon']}" in rec["prompt"]
    sampled = {c["family"] for c in rec["clues"]}
    assert sampled <= {"at", "same_motive", "either"}, sampled
    assert rec["config"] == cfg.to_dict() and rec["id"].startswith("tc-x3-")
    world = World.from_dict(sc)
    assert all(holds(c, world) for c in rec["clues"])
    assert "(no room)" in rec["prompt"] and "several suspects may share a motive" in rec["prompt"]


@pytest.mark.parametrize(
    "knobs,needle",
    [({"weapons": 40}, "'weapons'"),
     ({"suspects": 1}, "'suspects'"),
     ({"rooms": 7, "rows": 2, "cols": 3}, "'rooms'"),  # more rooms than the map holds
     ({"rooms": 6, "rows": 2, "cols": 3, "map": "irregular"}, "'rooms'"),
     ({"rooms": 4, "rows": 2, "cols": 3, "map": "rect"}, "'rooms'"),
     ({"map": "hexagonal"}, "'map'"),
     ({"motives": 9}, "'motives'"),  # more motives than suspects
     ({"times": 40}, "'times'"),
     ({"given": ("who", "weapon", "room", "time", "why"), "bonus": 0}, "'given'"),
     ({"given": ("alibi",)}, "'given'"),
     ({"bonus": -1}, "'bonus'"),
     ({"bonus_kinds": ("victim_room",)}, "'bonus_kinds'"),  # the victim does not move
     ({"clue_weights": {"gossip": 1}}, "'clue_weights'"),
     ({"clue_weights": {"fact": 0}}, "'clue_weights'"),
     ({"clue_weights": {"fact": -1, "either": 1}}, "'clue_weights'"),
     ({"clue_weights": {"victim_at": 1}}, "'clue_weights'"),
     ({"colour": "red"}, "unknown temporal clue knob")],
)  # fmt: skip
def test_impossible_knobs_name_the_knob(knobs, needle):
    with pytest.raises(ValueError, match=needle):
        make_config(6, **knobs)


def test_unknown_level_is_an_error():
    with pytest.raises(ValueError, match="players"):
        preset(11)
    with pytest.raises(ValueError, match="players"):
        generate_puzzle(1, 0)


def test_rooms_alone_pick_a_grid():
    c = make_config(5, rooms=7)
    assert (c.rows, c.cols, c.map) == (2, 4, "irregular")
    c = make_config(5, rooms=12)
    assert (c.rows, c.cols, c.map) == (3, 4, "rect")


def test_cli_knobs_errors_and_curriculum_order(tmp_path, capsys):
    cli = _cli()
    assert cli.parse_weights("either=2,iff=1.5,fact") == {"either": 2.0, "iff": 1.5, "fact": 1.0}
    with pytest.raises(SystemExit):
        cli.main(["--players", "0-11", "--out", str(tmp_path / "x.jsonl")])
    assert "--players must be within 1-10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--players", "2", "--weapons", "50", "--out", str(tmp_path / "x.jsonl")])
    assert "'weapons'" in capsys.readouterr().err
    # a shortcut bound no pool can meet stops after 5 candidates per puzzle, writing nothing
    with pytest.raises(SystemExit):
        cli.main(["--n", "1", "--players", "1", "--seed", "0", "--workers", "1",
                  "--shortcut-bound", "0", "--out", str(tmp_path / "b.jsonl")])  # fmt: skip
    assert "no 1 puzzles within --shortcut-bound in 5 candidates" in capsys.readouterr().err
    assert not (tmp_path / "b.jsonl").exists()
    with pytest.raises(SystemExit):
        cli.main(["--shortcut-bound", "some", "--out", str(tmp_path / "b.jsonl")])
    assert "bad --shortcut-bound 'some'" in capsys.readouterr().err
    out = tmp_path / "c.jsonl"
    cli.main(["--n", "6", "--seed", "4", "--players", "1-2", "--suspects", "4", "--workers", "1",
              "--clue-weights", "fact=1,either=1,murder_time=1,same_room=1", "--order", "curriculum",
              "--shortcut-bound", "off", "--out", str(out)])  # fmt: skip
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(len(r["scenario"]["suspects"]) == 4 for r in recs)
    keys = [(r["difficulty"]["conflicts"], r["difficulty"]["clues"]) for r in recs]
    assert keys == sorted(keys) and sorted(r["seed"] for r in recs) == [4_000_000 + i for i in range(6)]  # fmt: skip
