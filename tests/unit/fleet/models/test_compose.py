"""fleet.models.compose: requests among small talk, small talk alone as background,
every composition one served window, with the real MiniLM tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from config.data import data_path
from fleet.models.classifier import base_model_path
from fleet.models.compose import Filler, compose_examples, load_filler
from fleet.models.labeled import Example, TrainingDataError, load_labeled
from fleet.models.trainer import encode_rows
from workers.adapters.windowed import Reading, text_data, turns_of


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model_path()))


FILLER = Filler(
    user=("nice weather today", "haha ok", "did you watch the match", "morning!"),
    assistant=("Sure thing.", "Ha, good one!", "Anything else?"),
)
REQUESTS = [
    Example("Where does the handbook explain parental leave?", "rag_query"),
    Example("How do I ask my manager for a raise?", "professional"),
    Example("user: hi\nuser: I want to learn calculus, where do I start?", "learning", 2.0),
    Example("good morning!", "chitchat"),
]


def _count_words(text: str) -> int:
    return len(text.split())


def _compose(**kw: int) -> list[Example]:
    return compose_examples(
        REQUESTS, FILLER, background=["chitchat"], max_tokens=60, count_tokens=_count_words, **kw
    )


def test_each_request_is_composed_among_small_talk_with_its_label() -> None:
    out = _compose(per_example=3)
    requests = [ex for ex in out if ex.label != "chitchat"]
    assert Counter(ex.label for ex in requests) == {
        "rag_query": 3,
        "professional": 3,
        "learning": 3,
    }
    for ex in requests:
        source = next(r for r in REQUESTS if r.label == ex.label)
        core = source.text if "\n" in source.text else f"user: {source.text}"
        assert core in ex.text  # the request, whole, as a user turn
        assert ex.text != core  # with small talk around it
        assert ex.weight == source.weight
        assert _count_words(ex.text) <= 60
        roles = [m["role"] for m in text_data(ex.text)["messages"]]
        assert set(roles) <= {"user", "assistant"}


def test_small_talk_alone_is_the_background_label_and_never_holds_a_request() -> None:
    out = _compose(per_example=4, background_every=2)
    alone = [ex for ex in out if ex.label == "chitchat"]
    assert len(alone) == 3 * 4 // 2  # the background request itself is never composed around
    lines = {line.split(": ", 1)[1] for ex in alone for line in ex.text.split("\n")}
    assert lines <= set(FILLER.user) | set(FILLER.assistant)


def test_compositions_are_seeded() -> None:
    kw = {"background": ["chitchat"], "max_tokens": 60, "count_tokens": _count_words}
    assert compose_examples(REQUESTS, FILLER, seed=3, **kw) == compose_examples(
        REQUESTS, FILLER, seed=3, **kw
    )
    assert compose_examples(REQUESTS, FILLER, seed=3, **kw) != compose_examples(
        REQUESTS, FILLER, seed=4, **kw
    )


def test_a_request_longer_than_the_window_is_left_out_not_cut() -> None:
    long = Example(" ".join(["word"] * 100), "rag_query")
    out = compose_examples(
        [long],
        FILLER,
        background=["chitchat"],
        max_tokens=50,
        count_tokens=_count_words,
        background_every=1,
    )
    assert out and all(ex.label == "chitchat" for ex in out)


def test_composing_needs_a_background_label() -> None:
    with pytest.raises(ValueError, match="background_labels"):
        compose_examples(REQUESTS, FILLER, background=[], max_tokens=60, count_tokens=_count_words)


def test_the_shipped_filler_reads_and_every_composition_is_one_served_window(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """With the bundled small talk, the intent set and MiniLM's tokenizer at the served
    256 tokens: each composition is exactly one training row (no window of small talk
    alone carries a request's label)."""
    filler = load_filler(data_path("smalltalk.jsonl"))
    assert len(filler.user) >= 200 and len(filler.assistant) >= 100
    examples = load_labeled(data_path("intent.jsonl"))[::25]
    out = compose_examples(
        examples,
        filler,
        background=["chitchat"],
        max_tokens=256,
        count_tokens=lambda t: len(tokenizer(t)["input_ids"]),
    )
    assert len(out) > len(examples) // 2
    label2id = {name: i for i, name in enumerate(sorted({ex.label for ex in examples}))}
    rows = encode_rows(tokenizer, out, label2id, Reading(256))
    assert len(rows) == len(out)
    for ex in out:
        assert len(turns_of(text_data(ex.text), max_chars=100_000)) >= 2


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "not JSON"),
        (json.dumps({"role": "system", "content": "x"}), '"role"'),
        (json.dumps({"role": "user", "content": ""}), '"content"'),
        (json.dumps({"role": "user", "content": "two\nlines"}), '"content"'),
    ],
)
def test_a_bad_filler_line_is_refused_with_where(tmp_path: Path, line: str, says: str) -> None:
    path = tmp_path / "filler.jsonl"
    path.write_text(json.dumps({"role": "assistant", "content": "ok"}) + "\n" + line + "\n")
    with pytest.raises(TrainingDataError, match=f"filler.jsonl:2.*{says}"):
        load_filler(path)


def test_a_filler_file_needs_both_roles(tmp_path: Path) -> None:
    path = tmp_path / "filler.jsonl"
    path.write_text(json.dumps({"role": "user", "content": "hey"}) + "\n")
    with pytest.raises(TrainingDataError, match="both user and assistant"):
        load_filler(path)


def test_by_turn_adds_every_small_talk_user_line_alone_as_background() -> None:
    """A tier reading one user turn at a time reads each small-talk turn alone: with
    `by_turn`, every distinct filler user line is added once as a one-turn
    conversation labelled with the first background label, after the other
    compositions (which are drawn exactly as without it)."""
    filler = Filler(user=(*FILLER.user, "haha ok"), assistant=FILLER.assistant)
    kw = {"background": ["chitchat"], "max_tokens": 60, "count_tokens": _count_words}
    plain = compose_examples(REQUESTS, filler, per_example=2, **kw)
    by_turn = compose_examples(REQUESTS, filler, per_example=2, by_turn=True, **kw)
    assert by_turn[: len(plain)] == plain
    alone = by_turn[len(plain) :]
    assert [ex.text for ex in alone] == [f"user: {line}" for line in FILLER.user]
    assert {ex.label for ex in alone} == {"chitchat"} and {ex.weight for ex in alone} == {1.0}
    for ex in alone:  # one user turn: the window a by-turn tier reads for it
        assert turns_of(text_data(ex.text), max_chars=100_000) == [("user", ex.text)]
