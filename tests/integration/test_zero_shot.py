"""Zero-shot: embedding similarity with the real MiniLM, and the NLI path with a
tiny random NLI model (no real NLI model installs from a package here)."""

from __future__ import annotations

import pytest

from config.taskconfig import TierSpec
from fleet.models.catalogue import minilm_path
from workers.adapters.base import Prediction, Source
from workers.adapters.zero_shot import ZeroShotAdapter

LABELS = {
    "learning": "studying, courses, wanting to understand a concept",
    "social": "friends, family, relationships, social plans",
    "chitchat": "small talk, greetings, the weather",
}


def _src(i: int, text: str) -> Source:
    return Source(i, "conversation", f"e{i}", {"messages": [{"role": "user", "content": text}]})


def test_embedding_similarity_with_real_minilm():
    a = ZeroShotAdapter(labels=LABELS)
    a.load(TierSpec(name="minilm", path="", max_length=256), str(minilm_path()), "cpu")
    assert a.method == "embedding"
    texts = {
        "learning": "Which online course should I take to finally understand linear algebra?",
        "social": "My sister and her kids are visiting this weekend and we are planning a family dinner.",
        "chitchat": "Hi there! Lovely sunny weather today, isn't it?",
    }
    preds = a.predict([a.prepare(_src(i, t)) for i, t in enumerate(texts.values())])
    assert [p.label for p in preds if isinstance(p, Prediction)] == list(texts)
    for p in preds:
        assert isinstance(p, Prediction)
        assert set(p.scores) == set(LABELS) and abs(sum(p.scores.values()) - 1) < 1e-4


def test_multi_label_embedding_keeps_labels_over_threshold():
    a = ZeroShotAdapter(labels=LABELS, multi_label=True, threshold=0.0)
    a.load(TierSpec(name="minilm", path="", max_length=256), str(minilm_path()), "cpu")
    (p,) = a.predict([a.prepare(_src(0, "hello friends"))])
    assert isinstance(p, Prediction) and set(p.output["labels"]) == set(LABELS)


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("nli")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
        label2id={"contradiction": 0, "neutral": 1, "entailment": 2},
    )
    BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("multi", [False, True])
def test_nli_method_scores_every_label(tiny_nli, multi):
    a = ZeroShotAdapter(labels=LABELS, multi_label=multi)
    a.load(TierSpec(name="nli", path="", max_length=128), str(tiny_nli), "cpu")
    assert a.method == "nli"
    prepared = [
        a.prepare(_src(i, t)) for i, t in enumerate(["short", "a somewhat longer message " * 5])
    ]
    assert prepared[1].cost > prepared[0].cost  # pairs x longest pair
    preds = a.predict(prepared)
    for p in preds:
        assert isinstance(p, Prediction) and set(p.scores) == set(LABELS)
        if not multi:
            assert abs(sum(p.scores.values()) - 1) < 1e-4
        else:
            assert all(0 <= s <= 1 for s in p.scores.values())


def test_prototypes_file_adds_descriptions_and_examples():
    """Several descriptions and example texts per label, averaged per label."""
    from workers.adapters.zero_shot import label_prototypes

    texts, owners = label_prototypes(LABELS, "intent_prototypes.json")
    assert texts[0] == "learning: studying, courses, wanting to understand a concept"
    per_label = [owners.count(k) for k in range(len(LABELS))]
    assert all(n >= 5 for n in per_label), per_label  # description + 2 more + examples
    assert owners == sorted(owners)
    with pytest.raises(ValueError, match="not found"):
        label_prototypes(LABELS, "no-such-file.json")

    a = ZeroShotAdapter(labels=LABELS, prototypes="intent_prototypes.json")
    a.load(TierSpec(name="minilm", path="", max_length=256), str(minilm_path()), "cpu")
    assert a.label_emb.shape[0] == len(texts)
    texts_by_label = {
        "learning": "can u explain how vaccines train the immune system, for my bio homework",
        "social": "my cousin is getting married and I have to sit next to my ex at dinner",
        "chitchat": "lol ok. anyway hows ur weekend been",
    }
    preds = a.predict([a.prepare(_src(i, t)) for i, t in enumerate(texts_by_label.values())])
    assert [p.label for p in preds if isinstance(p, Prediction)] == list(texts_by_label)
    for p in preds:
        assert isinstance(p, Prediction) and abs(sum(p.scores.values()) - 1) < 1e-4


@pytest.mark.slow
def test_llm_method_scores_labels_zero_shot(smollm_dir):
    """The topic task on an LLM: label scoring through the zero-shot adapter."""
    a = ZeroShotAdapter(labels=LABELS)
    a.load(TierSpec(name="smollm", path="", max_length=1024), str(smollm_dir), "cpu")
    assert a.method == "llm"  # a causal LM folder picks the LLM method
    texts = {
        "learning": "Which online course should I take to finally understand linear algebra?",
        "chitchat": "Hi there! Lovely sunny weather today, isn't it?",
    }
    preds = a.predict([a.prepare(_src(i, t)) for i, t in enumerate(texts.values())])
    assert [p.label for p in preds if isinstance(p, Prediction)] == list(texts)
    for p in preds:
        assert isinstance(p, Prediction) and p.output["method"] == "llm"
        assert set(p.scores) == set(LABELS) and abs(sum(p.scores.values()) - 1) < 1e-4
    a.unload()
    assert a.llm is None


def test_examples_from_reads_one_role_of_a_turn_file(tmp_path):
    """`examples_from` adds a file's turns of one role to a label's prototypes (once each);
    a missing file, a line that is not a role/content object, or no turn of that role is
    refused with the file and line."""
    import json

    from workers.adapters.zero_shot import examples_from_file, label_prototypes

    turns = tmp_path / "talk.jsonl"
    turns.write_text(
        "\n".join(
            json.dumps(t)
            for t in (
                {"role": "user", "content": "my flatmate does yoga at 6am, the floor creaks"},
                {"role": "assistant", "content": "ha, early riser!"},
                {"role": "user", "content": "my flatmate does yoga at 6am, the floor creaks"},
                {"role": "user", "content": "  the cafe downstairs plays jazz now  "},
            )
        )
        + "\n\n",
        encoding="utf-8",
    )
    protos = tmp_path / "protos.json"
    protos.write_text(
        json.dumps(
            {
                "chitchat": {
                    "examples": ["hi!"],
                    "examples_from": {"file": str(turns), "role": "user"},
                }
            }
        ),
        encoding="utf-8",
    )
    texts, owners = label_prototypes(LABELS, str(protos))
    chit = list(LABELS).index("chitchat")
    assert [t for t, o in zip(texts, owners, strict=True) if o == chit] == [
        "chitchat: small talk, greetings, the weather",
        "hi!",
        "my flatmate does yoga at 6am, the floor creaks",
        "the cafe downstairs plays jazz now",
    ]
    assert examples_from_file({"file": str(turns)}, "chitchat")[1] == "ha, early riser!"

    with pytest.raises(ValueError, match="not found"):
        examples_from_file({"file": str(tmp_path / "none.jsonl")}, "chitchat")
    with pytest.raises(ValueError, match="examples_from must be an object"):
        examples_from_file("talk.jsonl", "chitchat")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"role": "user", "content": "ok"}\n{"text": "no role"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object"):
        examples_from_file({"file": str(bad)}, "chitchat")
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        examples_from_file({"file": str(bad)}, "chitchat")
    with pytest.raises(ValueError, match="no system turn"):
        examples_from_file({"file": str(turns), "role": "system"}, "chitchat")


def test_bundled_topic_holds_the_small_talk_filler_among_chitchat_prototypes():
    """The bundled topic task reads long conversations one user turn at a time: every
    user line of the small-talk filler intent is trained among is a chitchat prototype,
    so small talk that names a topic in passing sits near chitchat (docs/benchmarks.md,
    "Topic: the small-talk filler among chitchat's prototypes")."""
    import json

    from config.data import data_path
    from config.taskconfig import load_tasks
    from workers.adapters.zero_shot import label_prototypes

    spec = load_tasks()["topic"]
    texts, owners = label_prototypes(spec.labels, spec.options["prototypes"])
    chit = list(spec.labels).index("chitchat")
    chitchat = {t for t, o in zip(texts, owners, strict=True) if o == chit}
    filler = [json.loads(x) for x in data_path("smalltalk.jsonl").read_text().splitlines() if x]
    users = {t["content"].strip() for t in filler if t["role"] == "user"}
    assert len(users) > 200 and users <= chitchat
    assistant_only = {t["content"].strip() for t in filler if t["role"] == "assistant"} - users
    assert not (assistant_only & chitchat)
