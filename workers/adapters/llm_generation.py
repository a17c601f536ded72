"""`llm_classify`'s method "generate" and its torch glue.

The whole answer is generated, the reply *started* for the model (`{"category": "`),
the category *constrained* to spell a label, generation stopped when the object
closes, then parsed, validated and repaired at most once (`workers.adapters.llm_json`);
an unusable answer is an explicit `invalid_output` error, never a default label. An
answer cut by max_new_tokens is recorded as `truncated` and a cut value is missing
with its reason, never repaired into one. Also the dtype a tier loads in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from workers.adapters.base import Prediction
from workers.adapters.llm_json import (
    _SOFT_FIELDS,
    CategorySpeller,
    json_object_closed,
    parse_llm_json,
)


def resolve_dtype(dtype: str, on_cuda: bool) -> str:
    """The torch dtype name a tier loads in: `auto` is bfloat16 on CUDA, float32 on CPU.
    Raises ValueError for any other name than float32, float16 or bfloat16."""
    if dtype == "auto":
        return "bfloat16" if on_cuda else "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported dtype {dtype!r} (auto, float32, float16, bfloat16)")
    return dtype


def generation_hooks(
    speller: CategorySpeller | None,
    token_strings: Sequence[str],
    prompt_len: int,
    forced: Sequence[str],
) -> tuple[Any, Any]:
    """A LogitsProcessor that enforces the category spelling (None without a speller)
    and a StoppingCriteria that ends a row once its JSON object (forced prefix + new
    text) is closed. Built per call (they hold row state)."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    def generated_text(row: Sequence[int]) -> str:
        return "".join(token_strings[i] if i < len(token_strings) else "" for i in row)

    class _CategoryProcessor(LogitsProcessor):
        def __init__(self, spell: CategorySpeller) -> None:
            self.spell = spell
            self.done: set[int] = set()

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
            new = input_ids[:, prompt_len:].tolist()
            masked = None
            for row, ids in enumerate(new):
                if row in self.done:
                    continue
                allowed = self.spell.allowed(generated_text(ids))
                if allowed is None:
                    self.done.add(row)
                    continue
                if masked is None:
                    masked = scores.clone()
                keep = torch.tensor(allowed, dtype=torch.long, device=scores.device)
                row_scores = torch.full_like(scores[row], float("-inf"))
                row_scores[keep] = scores[row, keep]
                masked[row] = row_scores
            return scores if masked is None else masked

    class _JsonClosed(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> Any:
            new = input_ids[:, prompt_len:].tolist()
            flags = [
                json_object_closed(forced[row] + generated_text(ids)) for row, ids in enumerate(new)
            ]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return (_CategoryProcessor(speller) if speller is not None else None), _JsonClosed()


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    forced: list[str],
    *,
    speller: CategorySpeller | None,
    token_strings: Sequence[str],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: str,
) -> list[tuple[str, bool]]:
    """Greedy generation on one left-padded sub-batch of prompt ids.

    `forced`: the text each row's answer was started with (prepended to what comes
    back); `speller`: constrain the category's spelling (None: free). Returns (forced
    prefix + generated text, cut) per row; `cut` is True when the row used all
    `max_new_tokens` without closing its JSON object (a truncated answer).
    """
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    input_ids = input_ids.to(device)
    attention = attention.to(device)
    processor, stopper = generation_hooks(speller, token_strings, width, forced)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([processor] if processor else []),
            stopping_criteria=StoppingCriteriaList([stopper]),
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    results = []
    for row, new in enumerate(out[:, width:].tolist()):
        stop = [i for i, t in enumerate(new) if t in (eos_id, pad_id)]
        kept = new[: stop[0]] if stop else new
        text = forced[row] + tokenizer.decode(kept, skip_special_tokens=True)
        cut = len(kept) >= max_new_tokens and not json_object_closed(text)
        results.append((text, cut))
    return results


def generated_prediction(
    raw: str, labels: Mapping[str, str], truncated: int, cut: bool, max_new_tokens: int
) -> Prediction:
    """The Prediction of one generated answer: parsed, validated and repaired at most once
    (`llm_json`); an unusable answer is an `invalid_output` error with its reason (and
    whether it was cut at `max_new_tokens`), never a default label."""
    answer, error, repaired = parse_llm_json(raw, labels)
    limit = f"cut off at the token limit (max_new_tokens={max_new_tokens})"
    if answer is None:
        why = error or "unknown"
        if cut:
            why = f"{why}; the answer was {limit}"
        return Prediction(
            label=None,
            confidence=None,
            output={
                "status": "invalid_output",
                "raw": raw,
                "error": why,
                "truncated": cut,
                "truncated_tokens": truncated,
            },
            error=f"LLM output was not valid JSON after one repair: {why}",
        )
    if cut:
        for name in _SOFT_FIELDS:
            if answer["field_errors"].get(name) == "missing" or (
                name == "confidence" and answer["confidence"] is None
            ):
                answer["field_errors"][name] = f"missing: the answer was {limit}"
    scores: dict[str, float] | None = (
        {answer["category"]: answer["confidence"]} if answer["confidence"] is not None else None
    )
    output = {
        "status": "ok",
        "method": "generate",
        **answer,
        "raw": raw,
        "repaired": repaired,
        "truncated": cut,
        "truncated_tokens": truncated,
    }
    return Prediction(
        label=answer["category"], confidence=answer["confidence"], scores=scores, output=output
    )
