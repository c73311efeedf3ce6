"""Temporal Clue grader (issue 11 part 4): answer layouts, 24-hour times, hedges, adversarial sheets.

The grader must stay generic over entity names (new question kinds such as motives), so the
layout and hedge families are also property tests over generated names.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packrl.tasks.temporal_clue.grader import (
    grade,
    hedged,
    normalize,
    parse_answers,
    temporal_clue_format_reward,
    temporal_clue_reward,
)

KEY = {"A": "Mrs. White", "B": "Lead Pipe", "C": "Dining Room", "D": "11:45 PM", "E": "Greed"}

# Each layout from the issue, as a format string over (letter, answer).
LAYOUTS = [
    "**{l}**: {a}",
    "**{l}**. {a}",
    "**{l}.** {a}",
    "• {l}. {a}",
    "- {l}. {a}",
    "* {l}. {a}",
    "1. {l}. {a}",
    "1) {l}) {a}",
    "{l}) {a}",
    "{l} - {a}",
    "{l}: {a}",
    "| {l} | {a} |",
    # and their near relatives
    "{l}. {a}",
    "({l}) {a}",
    "- **{l}:** {a}",
    "### {l}. {a}",
    "> {l}. {a}",
    "{l} — {a}",
    "{l}. **{a}**",
    "**{l}. {a}**",
    "| **{l}** | {a} |",
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [str.upper, str.lower])
def test_each_layout_is_read(layout, case):
    sheet = "\n".join(
        layout.format(l=case(letter), a=answer) for letter, answer in KEY.items()
    )  # fmt: skip
    g = grade(sheet, KEY)
    assert g.score == 1.0, [d for d in g.details if not d["correct"]]


def test_markdown_table_with_header_and_question_column():
    table = (
        "| Question | Answer |\n|---|---|\n| A | Mrs. White |\n| B | Knife |\n"
        "| C. | In which room? | Dining Room |"  # more than two cells: the last is the answer
    )
    assert parse_answers(table, list(KEY)) == {"A": "Mrs. White", "B": "Knife", "C": "Dining Room"}
    assert grade(table, KEY).score == pytest.approx(2 / 5)


# Entity names of any shape: the grader knows no names, only the key.
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1,
               max_size=8)  # fmt: skip
NAME = (
    st.lists(WORD, min_size=1, max_size=3)
    .map(" ".join)
    .filter(lambda s: not hedged(s, "") and normalize(s) != "")
    .map(lambda s: s[0].upper() + s[1:])
)


@settings(max_examples=200, deadline=None)
@given(name=NAME, other=NAME, layout=st.sampled_from(LAYOUTS), letter=st.sampled_from("ABCDEFGHIJ"))  # fmt: skip
def test_layouts_and_hedges_for_any_entity_name(name, other, layout, letter):
    key = {letter: name}
    assert grade(layout.format(l=letter, a=name), key).score == 1.0
    assert grade(layout.format(l=letter, a=f"the {name.lower()}."), key).score == 1.0
    for hedge in HEDGES:
        assert grade(layout.format(l=letter, a=hedge.format(x=name, y=other)), key).score == 0.0


# Every hedge form scores 0, whatever the layout.
HEDGES = [
    "{x} (or {y})",
    "{x} or {y}",
    "{x}/{y}",
    "{x} / {y}",
    "{x}?",
    "{x} (?)",
    "{x} (probably)",
    "maybe {x}",
    "{x} (possibly {y})",
    "either {x} or {y}",
    "{x}, perhaps",
]


@pytest.mark.parametrize("hedge", HEDGES)
def test_each_hedge_scores_zero(hedge):
    sheet = "\n".join(f"{letter}. {answer}" for letter, answer in KEY.items())
    assert grade(sheet, KEY).score == 1.0
    hedged_sheet = sheet.replace(
        "A. Mrs. White", "A. " + hedge.format(x="Mrs. White", y="Mr. Green")
    )
    g = grade(hedged_sheet, KEY)
    assert g.score == pytest.approx(4 / 5)
    assert not g.details[0]["correct"] and g.details[0]["given"] is not None


def test_hedge_words_that_belong_to_the_answer_are_not_hedges():
    # Generic over names: a marker the key itself has does not count against it.
    key = {"A": "Either/Or Room"}
    assert grade("A. Either/Or Room", key).score == 1.0
    assert grade("A. Either/Or Room?", key).score == 0.0
    assert grade("A. Dr. Orchid", {"A": "Dr. Orchid"}).score == 1.0  # "or" inside a word


TIMES = [
    # (given, key, correct): the 24-hour clock for the morning as well as the evening
    ("01:00", "1:00 AM", True),
    ("1:00", "1:00 AM", True),
    ("01:00 AM", "1:00 AM", True),
    ("1:00 a.m.", "1:00 AM", True),
    ("01:00", "1:00 PM", False),
    ("13:00", "1:00 PM", True),
    ("00:15", "12:15 AM", True),
    ("0:00", "12:00 AM", True),
    ("midnight", "12:00 AM", True),
    ("12:30", "12:30 PM", True),
    ("12:30", "12:30 AM", False),
    ("23:45", "11:45 PM", True),
    ("at 23:45", "11:45 PM", True),
    ("11:45 PM", "11:45 PM", True),
    ("11:45", "11:45 PM", False),  # no AM/PM: 24-hour, so the morning
    ("11:45", "11:45 AM", True),
    ("09:30", "9:30 AM", True),
    ("21:30", "9:30 PM", True),
    ("11 PM", "11:00 PM", True),
    ("11 PM", "11:45 PM", False),
    ("24:00", "12:00 AM", False),  # not a clock time
    ("13:00 PM", "1:00 PM", False),
    ("11:75 PM", "11:15 PM", False),
    ("1145", "11:45 PM", False),
]


@pytest.mark.parametrize("given_time, key, ok", TIMES)
def test_times(given_time, key, ok):
    assert (grade(f"D. {given_time}", {"D": key}).score == 1.0) is ok


def test_times_on_the_24_hour_clock_cover_the_whole_day():
    for h in range(24):
        for m in (0, 15, 45):
            twelve = f"{(h - 1) % 12 + 1}:{m:02d} {'AM' if h < 12 else 'PM'}"
            assert normalize(f"{h:02d}:{m:02d}") == normalize(f"{h}:{m:02d}") == normalize(twelve)


# --- adversarial sheets -------------------------------------------------------------------
SUSPECTS = ["Miss Scarlett", "Colonel Mustard", "Mrs. White", "Mr. Green", "Mrs. Peacock"]


def test_an_answer_line_listing_every_entity_scores_zero():
    for sep in (", ", " ", " and ", "; ", " / ", " or "):
        assert grade("A. " + sep.join(SUSPECTS), {"A": "Mrs. White"}).score == 0.0
    # An aside is ignored, so what it lists can earn nothing: graded as its main answer.
    assert grade("A. Mr. Green (Mrs. White, Miss Scarlett)", {"A": "Mrs. White"}).score == 0.0
    assert grade("A. Mrs. White (she was alone with him)", {"A": "Mrs. White"}).score == 1.0


def test_the_same_letter_answered_twice_last_line_wins():
    # Rule: the last line for a letter is its answer (reasoning may come first), so a
    # letter answered with every suspect on its own line is graded on the last one alone.
    every = "\n".join(f"A. {s}" for s in SUSPECTS)
    assert grade(every, {"A": "Mrs. Peacock"}).score == 1.0
    assert grade(every, {"A": "Mrs. White"}).score == 0.0
    assert grade("A. Mrs. White\nA. Mr. Green", {"A": "Mrs. White"}).score == 0.0
    assert grade("| A | Mr. Green |\n**A.** Mrs. White", {"A": "Mrs. White"}).score == 1.0
    assert grade("A. Mrs. White\nA.", {"A": "Mrs. White"}).score == 1.0  # an empty line: no answer


def test_every_answer_on_one_line_is_one_answer():
    g = grade("A. Mrs. White B. Lead Pipe C. Dining Room", KEY)
    assert g.details[0]["given"] == "Mrs. White B. Lead Pipe C. Dining Room"
    assert g.score == 0.0


def test_reasoning_blocks_are_not_graded():
    final = "\n".join(f"{k}. {v}" for k, v in KEY.items())
    assert grade(f"<think>A. Mr. Green</think>\n{final}", KEY).score == 1.0
    assert grade(f"<think>{final}</think>\nI am not sure.", KEY).score == 0.0  # only reasoning
    assert grade(f"<think>{final}", KEY).score == 0.0  # cut off while thinking
    assert grade(f"{final}\n<think>more", KEY).score == 0.0
    assert grade(f"thinking...</think>{final}", KEY, think_opened=True).score == 1.0
    assert grade(final, KEY, think_opened=True).score == 0.0


def test_prose_and_unasked_letters_are_not_answers():
    prose = (
        "A man was killed.\nI. think so\n3. A clue says the Rope was in the Hall.\n"
        "- Mrs. White was in the Kitchen.\nF. Mrs. White\nA = Mrs. White"
    )
    assert parse_answers(prose, list(KEY)) == {}
    assert grade(prose, KEY).score == 0.0


def test_reward_functions_read_trl_message_completions_and_think_prefills():
    sol = [{"A": "Rope", "B": "Hall"}] * 3
    prefill = [{"role": "user", "content": "p"}, {"role": "assistant", "content": "<think>"}]
    comps = [
        "**A**: Rope\n| B | Hall |",
        [{"role": "assistant", "content": "A) Rope\nB - Hall?"}],
        "A. Rope\nB. Hall",  # with the prefill below: never left the reasoning block
    ]
    prompts = [[{"role": "user", "content": "p"}]] * 2 + [prefill]
    assert temporal_clue_reward(prompts=prompts, completions=comps, solution=sol) == [1.0, 0.5, 0.0]
    assert temporal_clue_format_reward(prompts=prompts, completions=comps, solution=sol) == [
        1.0,
        1.0,
        0.0,
    ]


def test_hedge_markers_are_whole_words():
    assert not hedged("Dr. Orchid", "Dr. Orchid")
    assert not hedged("Conservatory", "Conservatory")
    assert hedged("Knife or Rope", "Knife")
    assert hedged("Knife (or not)", "Knife")
