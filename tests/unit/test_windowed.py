"""Window inputs with the real MiniLM tokenizer (workers.adapters.windowed), and the
encoder adapters reading whole conversations (a random-weight BERT: the reading,
not the answers, is under test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.taskconfig import TierSpec
from workers.adapters.base import Source
from workers.adapters.text import conversation_text
from workers.adapters.windowed import (
    Reading,
    check_trained_reading,
    encode_windows,
    text_data,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fleet.models.catalogue import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def long_conversation(turns: int = 30, last: str = "please find the refund policy") -> dict:
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"small talk number {i} about the weather"})
        messages.append({"role": "assistant", "content": f"reply {i}: yes, lovely weather today"})
    messages.append({"role": "user", "content": last})
    return {"messages": messages}


SHORT = [
    {"messages": [{"role": "user", "content": "hi"}]},
    {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "   "},
            {"role": "user", "content": "find the vpn page in the wiki"},
        ]
    },
    {"text": "a transcript of a short call"},
]


@pytest.mark.parametrize("data", SHORT)
def test_a_short_conversation_is_one_window_with_the_old_ids(tokenizer, data) -> None:
    reading = Reading(256)
    w = encode_windows(tokenizer, data, reading, max_chars=10**6)
    old = tokenizer(conversation_text(data, max_chars=10**6), truncation=True, max_length=256)
    assert w.ids == [old["input_ids"]]
    assert len(w.plan.windows) == 1 and not w.plan.skipped


def test_a_long_conversation_is_read_whole_in_windows(tokenizer) -> None:
    data = long_conversation()
    w = encode_windows(tokenizer, data, Reading(64, max_windows=None), max_chars=10**6)
    assert len(w.ids) > 5
    assert all(len(ids) <= 64 for ids in w.ids)
    # the last turn, which the head never reached, is in the last window
    assert "refund policy" in tokenizer.decode(w.ids[-1])
    read = " ".join(tokenizer.decode(ids, skip_special_tokens=True) for ids in w.ids)
    for i in range(30):
        assert f"small talk number {i} " in read
    assert w.cost == max(len(ids) for ids in w.ids) * len(w.ids)


def test_max_windows_caps_the_cost_and_says_what_was_not_read(tokenizer) -> None:
    data = long_conversation(200)
    w = encode_windows(tokenizer, data, Reading(64, max_windows=4), max_chars=10**6)
    assert len(w.ids) == 4
    assert w.plan.tokens_unread > 1000
    assert w.plan.unread()[0]["first_turn"] > 0
    assert "refund policy" in tokenizer.decode(w.ids[-1])


def test_a_huge_single_message_is_split_with_overlap(tokenizer) -> None:
    data = {"messages": [{"role": "user", "content": "word " * 5000}]}
    w = encode_windows(tokenizer, data, Reading(128, max_windows=None, overlap=16), max_chars=10**6)
    assert len(w.ids) == pytest.approx(5000 / (126 - 16), abs=2)


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("plain text", {"text": "plain text"}),
        (
            "user: hi\nassistant: hello\nthere\nuser: bye",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello\nthere"},
                    {"role": "user", "content": "bye"},
                ]
            },
        ),
    ],
)
def test_text_data_gives_back_the_served_conversation(text, data) -> None:
    assert text_data(text) == data
    assert conversation_text(text_data(text), max_chars=10**6) == text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pooling": "median"}, "pooling"),
        ({"max_windows": 0}, "max_windows"),
        ({"window_by": "sentences"}, "window_by"),
        ({"turn_context": -1}, "turn_context"),
    ],
)
def test_bad_reading_options(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        Reading.from_options(256, options)


def test_a_folder_trained_on_other_windows_is_refused() -> None:
    check_trained_reading(None, Reading(256), model="m")
    check_trained_reading({"max_length": 256}, Reading(256), model="m")
    with pytest.raises(ValueError, match="trained on windows of 128 tokens"):
        check_trained_reading({"max_length": 128}, Reading(256), model="m")


def load(adapter, folder: Path, **options):
    adapter.load(
        TierSpec(name="t", path=str(folder), max_length=64, options=options), str(folder), "cpu"
    )
    return adapter


def test_sequence_classify_reads_every_window_and_records_it(tiny_models: Path) -> None:
    from workers.adapters.sequence_classify import SequenceClassifyAdapter

    a = load(SequenceClassifyAdapter(), tiny_models / "tiny-small", max_windows=6)
    items = [
        Source(1, "conversation", "short", SHORT[1]),
        Source(2, "conversation", "long", long_conversation()),
        Source(3, "conversation", "longer", long_conversation(200)),
    ]
    prepared = [a.prepare(s) for s in items]
    preds = a.predict(prepared)
    short, long, longer = (p.output["reading"] for p in preds)
    assert short == {"windows": 1, "tokens_read": len(prepared[0].payload.ids[0])}
    assert long["windows"] == 6 and long["pooling"] == "salient"
    assert 0 <= long["deciding_window"] < 6
    assert "unread" in long and long["tokens_unread"] > 0
    assert prepared[1].notes == {"unread_tokens": long["tokens_unread"]}
    assert longer["tokens_unread"] > long["tokens_unread"]
    # a long item costs what it reads
    windows = prepared[1].payload.ids
    assert prepared[1].cost == max(len(w) for w in windows) * 6 <= 6 * 64
    # the short item's label is the one it gets alone, read the old way
    alone = a.predict([a.prepare(items[0])])[0]
    assert preds[0].label == alone.label


def test_zero_shot_embedding_reads_every_window(tiny_models: Path) -> None:
    from workers.adapters.zero_shot import ZeroShotAdapter

    a = ZeroShotAdapter(labels={"a": "the weather", "b": "refund policy"})
    load(a, tiny_models / "tiny-small", method="embedding", max_windows=None)
    [short, long] = a.predict(
        [
            a.prepare(Source(i, "conversation", str(i), d))
            for i, d in enumerate([SHORT[0], long_conversation()])
        ]
    )
    assert short.output["reading"]["windows"] == 1
    assert long.output["reading"]["windows"] > 5
    assert "unread" not in long.output["reading"]


def test_multi_label_pools_each_label_over_windows(tmp_path: Path) -> None:
    """A multi-label folder reads a long conversation window by window and keeps, per
    label, its highest window probability (sigmoids, not renormalised)."""
    from tests.support import build_tiny_classifier
    from workers.adapters.sequence_classify import SequenceClassifyAdapter

    folder = build_tiny_classifier(tmp_path / "ml", labels=["a", "b", "c"], seed=3)
    config = json.loads((folder / "config.json").read_text())
    config["problem_type"] = "multi_label_classification"
    (folder / "config.json").write_text(json.dumps(config))
    a = load(SequenceClassifyAdapter(), folder, max_windows=6, thresholds=0.5)
    prepared = a.prepare(Source(1, "conversation", "long", long_conversation()))
    [pred] = a.predict([prepared])
    rows = a.window_probs([prepared.payload])
    assert len(rows) == 6 and any(abs(sum(r) - 1) > 1e-3 for r in rows)  # sigmoids
    peaks = {n: max(r[i] for r in rows) for i, n in enumerate(["a", "b", "c"])}
    assert pred.scores == pytest.approx(peaks, abs=1e-6)
    assert pred.output["reading"]["windows"] == 6 and pred.output["reading"]["pooling"] == "salient"
    assert pred.output["thresholds"] == dict.fromkeys("abc", 0.5)
    assert pred.output["thresholds_from"] == "tier"
    kept = sorted(n for n, p in pred.scores.items() if p >= 0.5)
    assert pred.label == (";".join(kept) or None)


def test_reading_by_user_turns_gives_the_request_its_own_window(tokenizer) -> None:
    """Packed windows put the closing request beside the small talk before it; read
    by user turn, the request is a window of its own (with `turn_context` tokens of
    the reply before it), and a short conversation is still read whole."""
    data = long_conversation(31, last="please find the refund policy")
    packed = encode_windows(tokenizer, data, Reading(64, max_windows=None), max_chars=10**6)
    last = len(data["messages"]) - 1
    assert len(packed.plan.windows[-1].turns) > 1  # the old reading: shared with small talk
    by_turn = Reading.from_options(64, {"window_by": "user_turns", "max_windows": None})
    turns = encode_windows(tokenizer, data, by_turn, max_chars=10**6)
    assert len(turns.plan.windows) == 32
    assert turns.plan.windows[-1].turns == (last,)
    alone = tokenizer("user: please find the refund policy")["input_ids"]
    assert turns.ids[-1] == alone
    ctx = Reading.from_options(
        64, {"window_by": "user_turns", "turn_context": 4, "max_windows": None}
    )
    with_ctx = encode_windows(tokenizer, data, ctx, max_chars=10**6)
    assert with_ctx.plan.windows[-1].turns == (last - 1, last)
    assert len(with_ctx.ids[-1]) == len(alone) + 4
    short = SHORT[1]
    assert (
        encode_windows(tokenizer, short, by_turn, max_chars=10**6).ids
        == encode_windows(tokenizer, short, Reading(64), max_chars=10**6).ids
    )
    assert by_turn.as_dict()["window_by"] == "user_turns"


def test_an_adapter_reading_by_user_turns_records_it(tiny_models: Path) -> None:
    from workers.adapters.sequence_classify import SequenceClassifyAdapter

    a = load(
        SequenceClassifyAdapter(),
        tiny_models / "tiny-small",
        window_by="user_turns",
        pooling="margin",
        background_labels=[],
        max_windows=None,
    )
    [pred] = a.predict([a.prepare(Source(1, "conversation", "long", long_conversation()))])
    reading = pred.output["reading"]
    assert reading["windows"] == 31 and reading["window_by"] == "user_turns"
    assert reading["pooling"] == "margin" and 0 <= reading["deciding_window"] < 31


def test_emoji_the_vocabulary_lacks_are_read_as_their_names(tokenizer) -> None:
    """MiniLM's WordPiece vocabulary reads every emoji as [UNK]: "😍😍" and "train
    cancelled again 🙄" lost what they say. They are read as their CLDR names."""
    from workers.adapters.windowed import readable

    reading = Reading(max_length=64)
    assert set(tokenizer.tokenize("😍 🙄")) == {tokenizer.unk_token}  # what was read before
    loved = encode_windows(tokenizer, text_data("😍😍"), reading, max_chars=10_000)
    words = tokenizer.convert_ids_to_tokens(loved.ids[0])
    assert tokenizer.unk_token not in words and "heart" in words and "eyes" in words
    rolled = readable(tokenizer, "train cancelled again 🙄")
    assert rolled.startswith("train cancelled again") and "face with rolling eyes" in rolled
    plain = "user: where is my parcel?"
    assert readable(tokenizer, plain) == plain  # text without emoji: the same ids as before
    same = encode_windows(tokenizer, text_data(plain), reading, max_chars=10_000)
    assert same.ids[0] == tokenizer(plain)["input_ids"]
