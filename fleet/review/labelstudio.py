"""Label Studio's task JSON, written for review and read back: pure functions, no I/O.

Written (import format, "Basic Label Studio JSON format" with pre-annotations,
labelstud.io/guide/predictions): a list of tasks,

    {"data": {"text": ..., "fleet_source": ..., "fleet_external_id": ..., "fleet_task": ...},
     "predictions": [{"model_version": ..., "score": p,
                      "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                                  "value": {"choices": [label]}}]}]}

with the labeling config `label_config(labels)` (a Choices control named
"label" over a Text object named "text"). Read (export format,
labelstud.io/guide/task_format): the same tasks with `annotations[]`, each
with `result[].value.choices` and `was_cancelled`; the newest annotation
that was not cancelled is the reviewed label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

FROM_NAME = "label"
TO_NAME = "text"


def label_config(labels: Sequence[str]) -> str:
    """The Label Studio labeling config (XML) the exported tasks are made for."""
    choices = "\n".join(f"    <Choice value={quoteattr(lab)}/>" for lab in labels)
    return (
        "<View>\n"
        f'  <Text name="{TO_NAME}" value="$text"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def to_task(
    *,
    text: str,
    source: str,
    external_id: str,
    task: str,
    label: str | None,
    score: float | None,
    model_version: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One Label Studio task with the fleet's answer as a pre-annotation (none without a label)."""
    data: dict[str, Any] = {
        "text": text,
        "fleet_source": source,
        "fleet_external_id": external_id,
        "fleet_task": task,
        **(extra or {}),
    }
    out: dict[str, Any] = {"data": data}
    if label is not None:
        prediction: dict[str, Any] = {
            "model_version": model_version,
            "result": [
                {
                    "from_name": FROM_NAME,
                    "to_name": TO_NAME,
                    "type": "choices",
                    "value": {"choices": [label]},
                }
            ],
        }
        if score is not None:
            prediction["score"] = float(score)
        out["predictions"] = [prediction]
    return out


@dataclass(frozen=True)
class Reviewed:
    """One reviewed label read from a file: whose item, which task, what label, who."""

    where: str  # "file:task 3" or "file:line 7", for messages
    source: str | None
    external_id: str | None
    task: str | None
    label: str | None
    reviewer: str | None
    problem: str | None = None  # why the line cannot be used (None: usable)


def _choice(result: Sequence[Any]) -> str | None:
    for region in result:
        if not isinstance(region, Mapping) or region.get("type") not in (None, "choices"):
            continue
        if region.get("from_name", FROM_NAME) != FROM_NAME:
            continue
        choices = (region.get("value") or {}).get("choices")
        if isinstance(choices, list) and choices:
            return str(choices[0])
    return None


def _reviewer(annotation: Mapping[str, Any]) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, Mapping):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def read_export(tasks: Any, *, where: str = "export") -> list[Reviewed]:
    """The reviewed labels of a Label Studio JSON export (a list of tasks).

    A task without a usable annotation (none, all cancelled, no choice) is
    returned with its `problem`, never dropped silently. Raises ValueError when
    `tasks` is not a list of objects."""
    if not isinstance(tasks, list):
        raise ValueError(f"{where}: a Label Studio export is a JSON list of tasks")
    out: list[Reviewed] = []
    for n, t in enumerate(tasks, 1):
        at = f"{where}: task {t.get('id', n) if isinstance(t, Mapping) else n}"
        if not isinstance(t, Mapping) or not isinstance(t.get("data"), Mapping):
            out.append(Reviewed(at, None, None, None, None, None, "not a task with 'data'"))
            continue
        data = t["data"]
        eid = data.get("fleet_external_id", data.get("external_id"))
        source = data.get("fleet_source", data.get("source"))
        task = data.get("fleet_task", data.get("task"))
        done = [
            a
            for a in t.get("annotations") or []
            if isinstance(a, Mapping) and not a.get("was_cancelled")
        ]
        label = reviewer = None
        for a in reversed(done):  # the newest annotation with a choice
            label = _choice(a.get("result") or [])
            if label is not None:
                reviewer = _reviewer(a)
                break
        problem = None
        if eid is None:
            problem = "the task's data has no fleet_external_id"
        elif label is None:
            problem = "no annotation with a choice (skipped or cancelled)"
        out.append(
            Reviewed(
                at,
                None if source is None else str(source),
                None if eid is None else str(eid),
                None if task is None else str(task),
                label,
                reviewer,
                problem,
            )
        )
    return out


def read_jsonl_line(obj: Any, *, where: str) -> Reviewed:
    """One JSONL line {"source", "external_id", "task", "label", "reviewer"} ("source",
    "task" and "reviewer" optional)."""
    if not isinstance(obj, Mapping):
        return Reviewed(where, None, None, None, None, None, "not a JSON object")
    eid, label = obj.get("external_id"), obj.get("label")
    problem = None
    if eid is None or label is None:
        problem = "needs 'external_id' and 'label'"
    src, task, who = obj.get("source"), obj.get("task"), obj.get("reviewer")
    return Reviewed(
        where,
        None if src is None else str(src),
        None if eid is None else str(eid),
        None if task is None else str(task),
        None if label is None else str(label),
        None if who is None else str(who),
        problem,
    )
