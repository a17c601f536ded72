from __future__ import annotations

import pytest

from producer.ingest import parse_conversation_line
from workers.adapters.base import InputError
from workers.adapters.text import conversation_messages, conversation_text


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"messages": []}, "conversation has no messages"),
        ({"messages": None}, "must be a list"),
        ({"messages": "hello"}, "must be a list"),
        ({"messages": [1]}, "message 0 is int"),
        ({"messages": [{"content": "x"}]}, "message 0 has no role"),
        ({"messages": [{"role": "user"}]}, "content must be a string, got NoneType"),
        (
            {"messages": [{"role": "user", "content": {"a": 1}}]},
            "content must be a string, got dict",
        ),
        ({"messages": [{"role": "user", "content": "   "}]}, "only empty messages"),
        ({"messages": [{"role": "user", "content": "x" * 101}]}, "exceeds 100 characters"),
        ({"text": ""}, "text to classify is empty"),
        ({"text": None}, "text to classify is empty"),
        # Empty to a reader: format and control characters only.
        ({"messages": [{"role": "user", "content": "\u200b\u200b\ufeff"}]}, "only empty"),
        ({"messages": [{"role": "user", "content": "\u0007\u0000\u001b"}]}, "only empty"),
        (
            {"messages": [{"role": "user", "content": "\u200d\u2060\u00ad \u202e\u200e"}]},
            "only empty",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "\u200b"},
                    {"role": "assistant", "content": "\u2028\u2029\u3000"},
                ]
            },
            "invisible characters",
        ),
        ({"text": "\ufeff\u200b\u200c"}, "text to classify is empty"),
    ],
)
def test_malformed_conversations(data, reason):
    with pytest.raises(InputError, match=reason):
        conversation_messages(data, max_chars=100)


def test_conversation_text():
    data = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "hello"},
        ]
    }
    assert conversation_text(data, max_chars=100) == "user: hi\nassistant: hello"
    assert conversation_text({"text": "a transcript"}, max_chars=100) == "a transcript"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{bad", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"messages": []}', "missing external_id"),
        (b'{"external_id": "", "messages": []}', "missing external_id"),
        (b'{"external_id": true, "messages": []}', "missing external_id"),
        (b'{"external_id": "a"}', "missing messages"),
        (
            b'{"external_id": "a", "messages": [{"role": "user", "content": "\\u0000"}]}',
            "NUL character",
        ),
        (b'{"external_id": "a", "messages": "\xff\xfe"}', "not valid UTF-8"),
        (b'{"external_id": "a", "messages": "\\ud800"}', "unpaired UTF-16 surrogate"),
        (b'{"external_id": "\\udfff", "messages": []}', "unpaired UTF-16 surrogate"),
        (b'{"external_id": "a", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
        (b'{"external_id": "' + b"x" * 257 + b'", "messages": []}', "at most 256"),
        (
            b'{"external_id": "a", "language": "english (united kingdom)", "messages": []}',
            "language",
        ),
    ],
)
def test_bad_lines(raw, reason):
    with pytest.raises(ValueError, match=reason):
        parse_conversation_line(raw, 1)


def test_paired_surrogates_escaped_backslashes_and_a_bom_are_fine():
    row = parse_conversation_line(
        '\ufeff{"external_id": "a", "messages": ["\\ud83d\\ude00 \\\\u0000 \\\\ud800"]}'.encode(),
        1,
    )
    assert row["messages"] == ["\U0001f600 \\u0000 \\ud800"]


def test_good_line_keeps_malformed_messages_for_the_worker():
    row = parse_conversation_line(b'{"id": 7, "messages": [{"role": 1}], "meta": {"k": "v"}}', 1)
    assert row == {
        "external_id": "7",
        "messages": [{"role": 1}],
        "language": None,
        "meta": {"k": "v"},
    }


@pytest.mark.parametrize(
    ("text", "blank"),
    [
        ("", True),
        (" \t\n", True),
        ("\u200b\ufeff\u0007", True),
        ("\ue000", True),  # private use: no glyph a reader knows
        ("a\u200b", False),
        ("\u0301", False),  # a lone combining mark is still a visible mark
        ("\U0001f600", False),  # an emoji is content
        ("\u4e2d", False),
    ],
)
def test_is_blank(text, blank):
    from workers.adapters.text import is_blank

    assert is_blank(text) is blank


def test_visible_text_beside_invisible_is_kept():
    data = {"messages": [{"role": "user", "content": "\u200bhello\u200b"}]}
    assert conversation_messages(data, max_chars=100)[0]["content"] == "\u200bhello\u200b"
