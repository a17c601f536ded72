"""Writes eval.jsonl: the emotions example's evaluation set, built from a planned grid
(eight speakers and their situations x nine label sets, clauses worded apart from the
training file), never trained on or used to choose anything. Run from this folder:
`python make_eval.py`."""

import itertools
import json

SPEAKERS = [
    ("As a night-shift nurse", "the rota for next month", "the ward inspection"),
    ("Speaking as a small bakery owner", "the flour supplier's new prices", "the lease renewal"),
    ("As a first-year student", "my chemistry lab grade", "the housing ballot"),
    ("As a retired teacher", "my pension statement", "my hip operation"),
    ("As a delivery driver", "the new route system", "my van's repair"),
    ("As a parent of twins", "the nursery waiting list", "the school transport"),
    ("As a freelance translator", "an unpaid invoice from a client", "a long contract offer"),
    ("As a volunteer coach", "the pitch booking", "the under-12s tournament"),
]
CLAUSES = {
    "worried": [
        "I dread what {b} might bring.",
        "What keeps me up at night is {b}.",
        "I'm uneasy that {b} could go badly.",
    ],
    "angry": [
        "It makes my blood boil how {a} was handled.",
        "I'm seething about {a}; nobody even apologised.",
        "I resent the way {a} was forced on us.",
    ],
    "grateful": [
        "Heartfelt thanks to everyone who helped with {a}.",
        "I'm indebted to the people who sorted out {a}.",
        "Bless the person who stepped in over {a}.",
    ],
    "hopeful": [
        "Things are looking up for {b}.",
        "There's a real chance {b} turns out well.",
        "I can see light at the end of the tunnel with {b}.",
    ],
}
NEUTRAL = [
    "{a} is on the agenda for Tuesday at ten.",
    "Could someone send me the details of {a}?",
    "I need to note down the date of {b}.",
]
SETS = [
    [],
    ["worried"],
    ["angry"],
    ["grateful"],
    ["hopeful"],
    ["hopeful", "worried"],
    ["angry", "worried"],
    ["grateful", "hopeful"],
    ["angry", "grateful"],
]

with open("eval.jsonl", "w") as f:
    for n, ((who, a, b), labels) in enumerate(itertools.product(SPEAKERS, SETS)):
        parts = [f"{who}, I want to talk about {a} and {b}."]
        if not labels:
            line = NEUTRAL[n % 3].format(a=a, b=b)
            parts.append(line[0].upper() + line[1:])
        for lab in labels:
            parts.append(CLAUSES[lab][n % 3].format(a=a, b=b))
        f.write(json.dumps({"text": " ".join(parts), "labels": labels}) + "\n")
