"""Pure parts of the LLM classifier: JSON parse/validate/repair, middle truncation and
the category-spelling constraint. No model, no torch: these decide whether a small
model's answer is kept, repaired or failed, so every branch is pinned here."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from workers.adapters.llm_classify import ANSWER_PREFIX, render_transcript, truncate_middle
from workers.adapters.llm_json import (
    CategorySpeller,
    json_object_closed,
    parse_llm_json,
    repair_json,
    validate_answer,
)

LABELS = [
    "rag_query",
    "professional",
    "psychological",
    "learning",
    "social",
    "emotional",
    "aspirational",
    "chitchat",
]

FULL = (
    '{"category": "learning", "confidence": 0.8, "reasoning": "wants to learn loops", '
    '"key_entities": ["Python"], "secondary_categories": ["professional"]}'
)


# (raw text, expected category or None, repaired, substring of the error or None)
PARSE_CASES: list[tuple[str, str | None, bool, str | None]] = [
    (FULL, "learning", False, None),
    ("  " + FULL + "\n", "learning", False, None),
    (FULL + " I hope this helps! {not json}", "learning", True, None),  # trailing text
    (FULL + "\n```", "learning", True, None),
    (
        '{"category": "social", "confidence": 0.4, "reasoning": "a friend was not invi',
        "social",
        True,
        None,
    ),
    (
        '{"category": "social", "confidence": 0.4, "key_entities": ["Anna", "Bo',
        "social",
        True,
        None,
    ),
    ('{"category": "social", "confidence": 0.4, "reasoning": "x",', "social", True, None),
    ('{"category": "social", "confidence": 0.4, "reasoning"', "social", True, None),  # dangling key
    ('{"category": "chitchat", "confidence": 0.5, "key_entities": [user]}', "chitchat", True, None),
    ('{"category": "social", "confidence": 0.', "social", True, None),  # cut inside a number
    ('```json\n{"category": "emotional", "confidence": 0.9}\n```', "emotional", True, None),
    ('{"category": "sports", "confidence": 0.9}', None, False, "not one of the labels"),
    ('{"category": "Learning", "confidence": 0.9}', None, False, "not one of the labels"),
    ('{"confidence": 0.9, "reasoning": "no category"}', None, False, "category"),
    ('{"category": 3}', None, False, "category"),
    ("The conversation is about learning.", None, False, "not JSON"),
    ("", None, False, "not JSON"),
    ('["learning"]', None, False, "expected a JSON object"),
    ('{"category": "lear', None, True, "not one of the labels"),  # repaired, still wrong
    ('{"category": ', None, True, "category: Field required"),  # repairs to {}
    ("category: learning", None, False, "no parseable prefix"),
]


@pytest.mark.parametrize(("raw", "category", "repaired", "error"), PARSE_CASES)
def test_parse_llm_json(raw: str, category: str | None, repaired: bool, error: str | None) -> None:
    answer, err, was_repaired = parse_llm_json(raw, LABELS)
    assert was_repaired is repaired
    if category is None:
        assert answer is None
        assert err is not None and error is not None and error in err
    else:
        assert err is None and answer is not None
        assert answer["category"] == category
        assert set(answer) == {
            "category",
            "confidence",
            "reasoning",
            "key_entities",
            "secondary_categories",
            "field_errors",
        }


def test_full_answer_fields() -> None:
    answer, err, repaired = parse_llm_json(FULL, LABELS)
    assert err is None and not repaired and answer is not None
    assert answer == {
        "category": "learning",
        "confidence": 0.8,
        "reasoning": "wants to learn loops",
        "key_entities": ["Python"],
        "secondary_categories": ["professional"],
        "field_errors": {},
    }


# confidence value -> (kept confidence, whether a field error is recorded)
CONFIDENCE_CASES: list[tuple[Any, float | None, bool]] = [
    (0.7, 0.7, False),
    (0, 0.0, False),
    (1, 1.0, False),
    ("0.65", 0.65, False),  # numeric string: lax number parsing
    (1.5, None, True),
    (-0.1, None, True),
    (85, None, True),  # a percentage is not guessed into 0.85
    ("high", None, True),
    ("100%", None, True),
    (True, None, True),
    (None, None, True),
    ([0.5], None, True),
]


@pytest.mark.parametrize(("value", "kept", "recorded"), CONFIDENCE_CASES)
def test_confidence_policy(value: Any, kept: float | None, recorded: bool) -> None:
    """A bad confidence keeps the (valid) category but is set to None and recorded."""
    answer, err = validate_answer({"category": "social", "confidence": value}, LABELS)
    assert err is None and answer is not None
    assert answer["category"] == "social"
    assert answer["confidence"] == kept
    assert ("confidence" in answer["field_errors"]) is recorded


def test_missing_confidence_is_recorded() -> None:
    answer, err = validate_answer({"category": "social"}, LABELS)
    assert err is None and answer is not None
    assert answer["confidence"] is None and answer["field_errors"]["confidence"] == "missing"


@pytest.mark.parametrize(
    "raw",
    [
        '{"category": "social", "confidence": 0.',  # cut at max_new_tokens (issue 10 item 6)
        '{"category": "social", "confidence": 0',
        '{"category": "social", "confidence": 0.8',  # may have been 0.85
        '{"category": "social", "confidence": -',
    ],
)
def test_cut_number_is_never_a_value(raw: str) -> None:
    """A reply cut inside a number keeps its category; the number is missing, not 0.0."""
    answer, err, repaired = parse_llm_json(raw, LABELS)
    assert err is None and repaired and answer is not None
    assert answer["category"] == "social"
    assert answer["confidence"] is None
    assert answer["field_errors"]["confidence"] == "missing"


def test_complete_number_before_a_cut_is_kept() -> None:
    answer, err, _ = parse_llm_json('{"category": "social", "confidence": 0.8, "reas', LABELS)
    assert err is None and answer is not None and answer["confidence"] == 0.8


@pytest.mark.parametrize(
    "raw",
    [
        "{'category': 'social', 'confidence': 0.9}",
        "Sure! { 'category': 'social' }",
    ],
)
def test_single_quoted_reply_names_its_fault(raw: str) -> None:
    answer, err, repaired = parse_llm_json(raw, LABELS)
    assert answer is None and not repaired
    assert err is not None and "single quotes" in err and "double quotes" in err


def test_reasoning_fields_of_a_cut_explanation() -> None:
    from workers.adapters.llm_json import reasoning_fields

    done = reasoning_fields(
        '{"category": "social", "reasoning": "a party", "key_entities": ["Ann"]}', False, 32
    )
    assert done == {"reasoning": "a party", "key_entities": ["Ann"], "field_errors": {}}
    cut = reasoning_fields('{"category": "social", "reasoning": "a par', True, 32)
    assert cut["reasoning"] == "" and "token limit" in cut["field_errors"]["reasoning"]
    assert "max_new_tokens=32" in cut["field_errors"]["reasoning"]
    cut_list = reasoning_fields(
        '{"category": "social", "reasoning": "a party", "key_entities": ["Ann", "Bo', True, 32
    )
    assert cut_list["reasoning"] == "a party" and cut_list["key_entities"] == ["Ann"]
    assert "token limit" in cut_list["field_errors"]["key_entities"]


def test_nan_confidence_from_json_is_rejected() -> None:
    answer, err, _ = parse_llm_json('{"category": "social", "confidence": NaN}', LABELS)
    assert err is None and answer is not None and answer["confidence"] is None


def test_soft_fields_reset_and_recorded() -> None:
    obj = {
        "category": "social",
        "confidence": 0.3,
        "reasoning": 42,
        "key_entities": "Anna",
        "secondary_categories": ["emotional", "social", "sports", "emotional"],
    }
    answer, err = validate_answer(obj, LABELS)
    assert err is None and answer is not None
    assert answer["reasoning"] == "" and answer["key_entities"] == []
    assert answer["secondary_categories"] == ["emotional"]  # main, unknown and duplicate dropped
    assert set(answer["field_errors"]) == {"reasoning", "key_entities", "secondary_categories"}
    assert "sports" in answer["field_errors"]["secondary_categories"]


def test_null_optional_fields_are_empty() -> None:
    answer, err = validate_answer(
        {"category": "chitchat", "confidence": 0.2, "reasoning": None, "key_entities": None}, LABELS
    )
    assert err is None and answer is not None
    assert answer["reasoning"] == "" and answer["key_entities"] == []


def test_extra_keys_ignored() -> None:
    answer, err = validate_answer({"category": "chitchat", "confidence": 0.2, "mood": "x"}, LABELS)
    assert err is None and answer is not None and "mood" not in answer


# ----------------------------------------------------------------- repair_json


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1} tail', '{"a": 1}'),
        ('noise {"a": "b}"} tail', '{"a": "b}"}'),  # brace inside a string
        ('{"a": "x\\"y', '{"a": "x\\"y"}'),  # escaped quote stays escaped
        ('{"a": [1, 2', '{"a": [1]}'),  # the 2 may have been 23: dropped, not guessed
        ('{"a": [1, 2 ', '{"a": [1, 2]}'),  # a delimiter after it: complete
        ('{"a": 1, "b": 0.', '{"a": 1}'),  # a cut number is never a value
        ('{"a": 1, "b": 0.5', '{"a": 1}'),
        ('{"a": 1, "b": tru', '{"a": 1}'),
        ('{"a": {"b": 1}, "c": ', '{"a": {"b": 1}}'),
        ("no json", None),
        ("{", "{}"),
    ],
)
def test_repair_json(text: str, expected: str | None) -> None:
    assert repair_json(text) == expected


@pytest.mark.parametrize(
    ("text", "closed"),
    [
        (ANSWER_PREFIX, False),
        (ANSWER_PREFIX + 'social", "confidence": 0.5', False),
        (ANSWER_PREFIX + 'social", "reasoning": "a } b"', False),
        (ANSWER_PREFIX + 'social", "x": {"y": 1}', False),
        (ANSWER_PREFIX + 'social", "confidence": 0.5}', True),
        (ANSWER_PREFIX + 'social", "x": [user]} more', True),
        ("no object", False),
    ],
)
def test_json_object_closed(text: str, closed: bool) -> None:
    assert json_object_closed(text) is closed


# ----------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    ("n", "max_len", "marker", "expected", "dropped"),
    [
        (5, 10, [], [0, 1, 2, 3, 4], 0),
        (10, 10, [], list(range(10)), 0),
        (10, 4, [], [0, 1, 8, 9], 6),
        (10, 5, [], [0, 1, 2, 8, 9], 5),  # odd room: the head gets the extra token
        (10, 6, [-1, -1], [0, 1, -1, -1, 8, 9], 6),  # marker counts towards max_len
        (10, 1, [], [0], 9),
        (10, 2, [-1, -1], [0, 9], 8),  # no room for the marker: dropped, ids kept
        (10, 0, [], [], 10),
    ],
)
def test_truncate_middle(
    n: int, max_len: int, marker: list[int], expected: list[int], dropped: int
) -> None:
    kept, cut = truncate_middle(list(range(n)), max_len, marker)
    assert kept == expected
    assert cut == dropped
    assert len(kept) <= max_len


def test_truncate_middle_long() -> None:
    ids = list(range(10_000))
    kept, cut = truncate_middle(ids, 300, [-7])
    assert len(kept) == 300 and cut == 10_000 - 299
    assert kept[:150] == ids[:150] and kept[150] == -7 and kept[151:] == ids[-149:]


def test_truncate_middle_rejects_negative() -> None:
    with pytest.raises(ValueError):
        truncate_middle([1, 2], -1)


def test_render_transcript_skips_empty() -> None:
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "  "},
        {"role": "user", "content": "bye"},
    ]
    assert render_transcript(msgs) == "user: hi\nuser: bye"


# ----------------------------------------------------------------- constraint

# A toy vocabulary: ids are positions.
VOCAB = [
    "<eos>",
    "so",
    "cial",
    "social",
    '"',
    '",',
    "chit",
    "chat",
    "c",
    "h",
    "x",
    " social",
    "soc",
    'ial"',
    "\ufffd",
]


def _ids(*strings: str) -> set[int]:
    return {VOCAB.index(s) for s in strings}


def test_speller_start_allows_label_prefixes_only() -> None:
    sp = CategorySpeller(["social", "chitchat"], VOCAB, skip_ids=[0])
    assert set(sp.allowed("") or []) == _ids("so", "social", "chit", "c", "soc")


def test_speller_midway_and_closing() -> None:
    sp = CategorySpeller(["social", "chitchat"], VOCAB, skip_ids=[0])
    assert set(sp.allowed("so") or []) == _ids("cial", "c")
    assert set(sp.allowed("soc") or []) == _ids('ial"')
    assert set(sp.allowed("social") or []) == _ids('"', '",')
    assert sp.allowed('social"') is None  # done: no constraint any more
    assert sp.allowed('social", "confidence') is None


def test_speller_label_that_prefixes_another() -> None:
    sp = CategorySpeller(["chit", "chitchat"], VOCAB)
    assert set(sp.allowed("chit") or []) == _ids('"', '",', "chat", "c")


def test_speller_rejects_unspellable_label() -> None:
    with pytest.raises(ValueError, match="cannot be spelled"):
        CategorySpeller(["zebra"], VOCAB)


def test_module_does_not_import_torch() -> None:
    """The pure helpers must stay usable (and testable) without torch loaded."""
    code = "import sys, workers.adapters.llm_classify; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
