"""Reading a whole conversation with an encoder of limited length: windows and pooling.

An encoder reads at most `max_length` tokens. A conversation longer than that is
split into windows that follow turn boundaries; every window runs through the
model, and the per-window label probabilities are pooled into one prediction.

    turns (role, token count)
      -> build_windows(size, overlap, max_windows)   whole turns packed greedily;
                                                      a turn longer than a window is
                                                      cut into overlapping pieces
      -> WindowPlan (windows read, what was not read)
      -> the model: one probability row per window
      -> pool(rows, plan, rule)                       one row, and the window that decided

Pure functions over plain values (no torch, no tokenizer): the adapters
(`sequence_classify`, `zero_shot`) and `fleet train` build the same windows from
the same numbers, so what is trained is what is served.

Pooling rules (the tier option `pooling`):
  max       per label, the highest probability over windows, renormalised (the
            "max over passages" of long-document classification, e.g. Dai et al.
            2022, "Revisiting Transformer-based Models for Long Document
            Classification")
  mean      the plain mean of window probabilities
  recency   a mean weighted toward the latest windows that hold user text:
            weight = user_share x decay^(windows after it); a window with no user
            text weighs `assistant_weight`
  role      a mean weighted by each window's share of user tokens (assistant-only
            windows weigh `assistant_weight`)
  salient   multiple-instance reading ("a conversation is about X when one of its
            windows is", Dietterich et al. 1997; the max-instance rule of
            multiple-instance learning): with the tier's `background_labels`
            (small talk, greetings), the window whose best label outside the
            background is the most probable decides, when that probability is at
            least `salient_threshold` (0.5), and its row is the item's; else
            (nothing but background anywhere) the recency rule. Without
            background labels it is `max`.
  margin    with background labels: the window whose best label outside the
            background leads the best background label by the most decides
            (its row is the item's), when some window has such a lead at all;
            else the recency rule. Without background labels it is `max`.
  latest    with background labels: the latest window whose best label outside
            the background leads every background label decides (a request
            appended to an old thread, or asked after an earlier one was
            resolved, is what the conversation is about now); else the recency
            rule. Without background labels it is `max`.

A multi-label model's windows are pooled by `pool_independent`: each label is
its own yes/no, so `max`, `salient`, `margin` and `latest` keep per label the highest window
probability (not renormalised) and the weighted rules average per label.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

POOLING_RULES = ("max", "mean", "recency", "role", "salient", "margin", "latest")
SALIENT_THRESHOLD = 0.5
USER_ROLES = frozenset({"user", "human", "customer", "caller"})


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of turn `turn` (indices into the conversation's turns)."""

    turn: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Window:
    """One model input: consecutive segments, in conversation order.

    `user_tokens` counts the tokens of user turns (roles in USER_ROLES), which
    the role-aware pooling rules weigh."""

    segments: tuple[Segment, ...]
    user_tokens: int

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def turns(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(s.turn for s in self.segments))


@dataclass(frozen=True)
class WindowPlan:
    """The windows to read and what is left unread.

    `skipped` are windows built but not read because of `max_windows` (their
    turn ranges are reported on the result); `empty_turns` are turns with no
    tokens (blank messages), which no window holds."""

    windows: tuple[Window, ...]
    skipped: tuple[Window, ...] = ()
    empty_turns: tuple[int, ...] = ()

    @property
    def tokens_read(self) -> int:
        return sum(w.tokens for w in self.windows)

    @property
    def tokens_unread(self) -> int:
        return sum(w.tokens for w in self.skipped)

    def unread(self) -> list[dict[str, int]]:
        """What was not read, for the result: [{"turns": "a-b", "tokens": n}, ...]."""
        out = []
        for w in self.skipped:
            turns = w.turns
            out.append({"first_turn": turns[0], "last_turn": turns[-1], "tokens": w.tokens})
        return out


def is_user(role: str) -> bool:
    return role.lower() in USER_ROLES


def build_windows(
    turns: Sequence[tuple[str, int]],
    *,
    size: int,
    overlap: int = 0,
    max_windows: int | None = None,
) -> WindowPlan:
    """Split turns (role, token count) into windows of at most `size` tokens.

    Whole turns are packed greedily in order; a turn that does not fit in the
    current window starts a new one (turn boundaries are respected). A turn
    longer than `size` is cut into pieces of `size` tokens, each starting
    `size - overlap` tokens after the previous one, so no sentence is lost at a
    cut. Turns with 0 tokens are skipped and listed in `empty_turns`.

    With `max_windows`, at most that many windows are read: the first window
    (where a conversation usually states its subject) and the latest
    `max_windows - 1` (where the request that decides the label usually is);
    the windows between are `skipped`.

    Raises ValueError when size < 1, overlap is not in [0, size) or max_windows < 1.
    """
    if size < 1:
        raise ValueError(f"window size must be at least 1 token, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, {size}), got {overlap}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    windows: list[Window] = []
    empty: list[int] = []
    current: list[Segment] = []
    user = 0

    def close() -> None:
        nonlocal current, user
        if current:
            windows.append(Window(tuple(current), user))
        current, user = [], 0

    used = 0
    for i, (role, n) in enumerate(turns):
        if n <= 0:
            empty.append(i)
            continue
        if n > size:
            close()
            used = 0
            step = size - overlap
            start = 0
            while True:
                end = min(start + size, n)
                windows.append(Window((Segment(i, start, end),), (end - start) * is_user(role)))
                if end >= n:
                    break
                start += step
            continue
        if used + n > size:
            close()
            used = 0
        current.append(Segment(i, 0, n))
        user += n * is_user(role)
        used += n
    close()
    return _plan(windows, empty, max_windows)


def _plan(windows: list[Window], empty: list[int], max_windows: int | None) -> WindowPlan:
    """Keep the first window and the latest `max_windows - 1` (see build_windows)."""
    if max_windows is None or len(windows) <= max_windows:
        return WindowPlan(tuple(windows), (), tuple(empty))
    if max_windows == 1:
        kept = {len(windows) - 1}
    else:
        kept = {0, *range(len(windows) - (max_windows - 1), len(windows))}
    return WindowPlan(
        tuple(w for k, w in enumerate(windows) if k in kept),
        tuple(w for k, w in enumerate(windows) if k not in kept),
        tuple(empty),
    )


def build_turn_windows(
    turns: Sequence[tuple[str, int]],
    *,
    size: int,
    overlap: int = 0,
    context: int = 0,
    max_windows: int | None = None,
) -> WindowPlan:
    """One window per user turn (role in USER_ROLES): the last `context` tokens
    of the turn before it (any role), then the user turn, at most `size` tokens.

    A user turn longer than `size - context` is cut into pieces like
    `build_windows` cuts a long turn (the first piece gets the context). Other
    turns are read only as context. `max_windows` keeps the first and the latest
    windows as `build_windows` does. A conversation with no user turn is packed
    by `build_windows` (nothing would be read otherwise). Empty turns are listed
    in `empty_turns`.

    Raises ValueError when size < 1, overlap is not in [0, size), context is
    not in [0, size) or max_windows < 1.
    """
    if size < 1:
        raise ValueError(f"window size must be at least 1 token, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, {size}), got {overlap}")
    if not 0 <= context < size:
        raise ValueError(f"turn context must be in [0, {size}), got {context}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    if not any(is_user(role) and n > 0 for role, n in turns):
        return build_windows(turns, size=size, overlap=overlap, max_windows=max_windows)
    windows: list[Window] = []
    empty = [i for i, (_, n) in enumerate(turns) if n <= 0]
    for i, (role, n) in enumerate(turns):
        if n <= 0 or not is_user(role):
            continue
        before = next((k for k in range(i - 1, -1, -1) if turns[k][1] > 0), None)
        lead: tuple[Segment, ...] = ()
        if context and before is not None:
            m = turns[before][1]
            lead = (Segment(before, max(0, m - context), m),)
        room = size - sum(s.length for s in lead)
        if n <= room:
            windows.append(Window((*lead, Segment(i, 0, n)), n))
            continue
        step = max(1, size - overlap)
        start, first = 0, True
        while True:
            width = room if first else size
            end = min(start + width, n)
            windows.append(Window((*(lead if first else ()), Segment(i, start, end)), end - start))
            if end >= n:
                break
            start = max(start + 1, end - overlap) if first else start + step
            first = False
    return _plan(windows, empty, max_windows)


@dataclass(frozen=True)
class Pooled:
    """One probability row for the item and the window index (into the plan's
    windows) that decided it: the window giving the winning label most weight."""

    probs: tuple[float, ...]
    deciding: int


def window_weights(
    plan: WindowPlan, rule: str, *, decay: float = 0.5, assistant_weight: float = 0.1
) -> list[float]:
    """The weight of each read window under a weighted rule (mean, recency, role).

    recency: user_share x decay^(k), k = windows after it that hold user text.
    role: user_share. A window with no user text weighs `assistant_weight` x
    its recency factor. Raises ValueError for an unknown rule."""
    n = len(plan.windows)
    if rule == "mean" or rule == "max":
        return [1.0] * n
    if rule not in POOLING_RULES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_RULES)}, got {rule!r}")
    shares = [w.user_tokens / w.tokens if w.tokens else 0.0 for w in plan.windows]
    out = []
    later_user = 0
    for k in range(n - 1, -1, -1):
        base = shares[k] if shares[k] > 0 else assistant_weight
        factor = decay**later_user if rule == "recency" else 1.0
        out.append(base * factor)
        if shares[k] > 0:
            later_user += 1
    return out[::-1]


def pool(
    rows: Sequence[Sequence[float]],
    plan: WindowPlan,
    rule: str,
    *,
    decay: float = 0.5,
    assistant_weight: float = 0.1,
    background: Collection[int] = (),
    threshold: float = SALIENT_THRESHOLD,
) -> Pooled:
    """Pool per-window probabilities (windows x labels) into one row.

    One window: its row unchanged (a short conversation gets exactly the
    prediction it would get read whole). `background`: label indices the
    `salient` rule looks past (see the module's rules). Raises ValueError when
    the row count differs from the plan's windows or the rule is unknown."""
    if len(rows) != len(plan.windows) or not rows:
        raise ValueError(f"{len(rows)} probability rows for {len(plan.windows)} windows")
    if len(rows) == 1:
        return Pooled(tuple(float(x) for x in rows[0]), 0)
    labels = len(rows[0])
    if rule in ("margin", "latest"):
        if not background:
            rule = "max"
        else:
            focus = [j for j in range(labels) if j not in background]
            lead = [
                (max(rows[k][j] for j in focus) - max(rows[k][b] for b in background), k)
                for k in range(len(rows))
            ]
            ahead = [k for gap, k in lead if gap > 0]
            if ahead:
                k = ahead[-1] if rule == "latest" else max(lead)[1]
                return Pooled(tuple(float(x) for x in rows[k]), k)
            rule = "recency"
    if rule == "salient":
        if not background:
            rule = "max"
        else:
            focus = [j for j in range(labels) if j not in background]
            k, j = max(
                ((k, j) for k in range(len(rows)) for j in focus), key=lambda kj: rows[kj[0]][kj[1]]
            )
            if rows[k][j] >= threshold:
                return Pooled(tuple(float(x) for x in rows[k]), k)
            rule = "recency"
    if rule == "max":
        peak = [max(r[j] for r in rows) for j in range(labels)]
        total = sum(peak) or 1.0
        probs = tuple(p / total for p in peak)
        best = max(range(labels), key=probs.__getitem__)
        return Pooled(probs, max(range(len(rows)), key=lambda k: rows[k][best]))
    weights = window_weights(plan, rule, decay=decay, assistant_weight=assistant_weight)
    total = sum(weights) or 1.0
    probs = tuple(
        sum(w * r[j] for w, r in zip(weights, rows, strict=True)) / total for j in range(labels)
    )
    best = max(range(labels), key=probs.__getitem__)
    return Pooled(probs, max(range(len(rows)), key=lambda k: weights[k] * rows[k][best]))


def pool_independent(
    rows: Sequence[Sequence[float]],
    plan: WindowPlan,
    rule: str,
    *,
    decay: float = 0.5,
    assistant_weight: float = 0.1,
) -> Pooled:
    """Pool per-window probabilities of independent labels (a multi-label model's
    sigmoids: each label is its own yes/no, rows need not sum to 1) into one row.

    `max`, `salient`, `margin` and `latest`: per label, the highest probability over windows (a
    conversation is worried when one of its windows is; multiple-instance
    reading per label), never renormalised; `mean`, `recency` and `role`: the
    weighted mean of each label's probabilities (`window_weights`). One window:
    its row unchanged. The deciding window is the one giving the item's most
    probable label its value. Raises ValueError when the row count differs from
    the plan's windows or the rule is unknown."""
    if len(rows) != len(plan.windows) or not rows:
        raise ValueError(f"{len(rows)} probability rows for {len(plan.windows)} windows")
    if len(rows) == 1:
        return Pooled(tuple(float(x) for x in rows[0]), 0)
    labels = len(rows[0])
    if rule in ("max", "salient", "margin", "latest"):
        probs = tuple(float(max(r[j] for r in rows)) for j in range(labels))
        best = max(range(labels), key=probs.__getitem__)
        return Pooled(probs, max(range(len(rows)), key=lambda k: rows[k][best]))
    weights = window_weights(plan, rule, decay=decay, assistant_weight=assistant_weight)
    total = sum(weights) or 1.0
    probs = tuple(
        sum(w * r[j] for w, r in zip(weights, rows, strict=True)) / total for j in range(labels)
    )
    best = max(range(labels), key=probs.__getitem__)
    return Pooled(probs, max(range(len(rows)), key=lambda k: weights[k] * rows[k][best]))


def fit_turns(
    turns: Sequence[tuple[str, int]], room: int, *, assistant_cap: int
) -> tuple[list[Segment], int]:
    """Which tokens of each turn go into one prompt of `room` tokens, built around
    the user's turns (for a causal LM that reads one prompt, not windows).

    1. an assistant turn longer than `assistant_cap` keeps its first
       `assistant_cap` tokens (0 drops assistant turns);
    2. while over `room`: drop assistant turns, oldest first; then user turns,
       oldest first, never the latest user turn (the latest are kept first);
    3. the latest user turn alone longer than `room` keeps its last `room` tokens.

    Returns (segments in conversation order, tokens left out). Empty turns are
    left out at no cost. Raises ValueError when room < 1 or assistant_cap < 0.
    """
    if room < 1:
        raise ValueError(f"room must be at least 1 token, got {room}")
    if assistant_cap < 0:
        raise ValueError(f"assistant_cap must be >= 0, got {assistant_cap}")
    total = sum(max(n, 0) for _, n in turns)
    keep: dict[int, Segment] = {}
    for i, (role, n) in enumerate(turns):
        if n <= 0:
            continue
        end = n if is_user(role) else min(n, assistant_cap)
        if end > 0:
            keep[i] = Segment(i, 0, end)
    users = [i for i in keep if is_user(turns[i][0])]
    latest = users[-1] if users else None

    def used() -> int:
        return sum(s.length for s in keep.values())

    for i in [i for i in keep if i not in users]:
        if used() <= room:
            break
        del keep[i]
    for i in users[:-1]:
        if used() <= room:
            break
        del keep[i]
    if latest is not None and used() > room:
        n = keep[latest].end
        keep[latest] = Segment(latest, n - room, n)
    segments = [keep[i] for i in sorted(keep)]
    return segments, total - sum(s.length for s in segments)
