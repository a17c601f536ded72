"""Classify a conversation with a small causal LM into the JSON contract (category,
confidence, reasoning, key_entities, secondary_categories).

Two methods (task option `method`):

* "score" (default): label scoring. The prompt ends with "This conversation is
  about" and each label's phrase(s) are scored as its continuation
  (`workers.adapters.label_scoring`): the instructions' KV cache is computed once at
  load, a sub-batch is one forward over the conversations and one over the label
  tokens. The per-label log-probabilities become a distribution, calibrated by
  dividing out that of a content-free input (Zhao et al. 2021, "Calibrate Before
  Use"); `scores` is that distribution, `confidence` its maximum, secondary
  categories the other labels with at least `secondary_threshold`. Why: a 135M model
  that writes its answer mostly writes its favourite label (0.16-0.28 accuracy);
  scored and calibrated it reaches 0.635, at 26x the items/s (docs/benchmarks.md).
  With the task options `temperature` and `label_bias` (fitted on labeled training
  text by `fleet calibrate --task llm_classify --data FILE`) the distribution is
  softmax(log p / temperature + label_bias) instead (the bias half of vector scaling,
  Guo et al. 2017): learned from labeled text rather than read off one content-free
  input. `reasoning = true` generates reasoning and key_entities afterwards, the category
  already fixed (JSON prompt, started reply).
* "generate": the whole answer is generated, its category constrained to spell a label
  (`workers.adapters.llm_generation`).

Long conversations (tier option `window_by = "user_turns"`): past `window_tokens`
rendered tokens, each user turn is scored as its own prompt (at most `max_windows`,
the first and the latest kept) and the turns' calibrated distributions are pooled by
`workers.windows.pool` with the tier's `pooling` and `background_labels`, as the
encoders pool windows; `output.reading` says which turn decided.

Conversation text is tokenized with special tokens split, so a message holding the
chat template's control strings (a fake end of turn and assistant turn) stays text.
Truncation works on token ids of the rendered transcript (`truncate_middle`): head and
tail kept, a marker line in place of the middle. Models with a chat template get
system/user/assistant turns; base models (Gemma 3 270M) the same text plainly.

The prompt pieces are pure functions in `workers.adapters.llm_prompt` and the torch
glue of generation is in `workers.adapters.llm_generation`, so they are unit tested
without a model; torch/transformers are imported only inside `load`/`predict`.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from typing import Any

from config.taskconfig import TierSpec
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.label_scoring import (
    CONTENT_FREE_INPUTS,
    calibrated,
    label_distribution,
    mean_distribution,
    per_label_logprobs,
    prefix_cache_for,
    score_continuations,
)
from workers.adapters.llm_generation import (
    generated_prediction,
    greedy_generate,
    resolve_dtype,
)
from workers.adapters.llm_json import (
    CategorySpeller,
    json_object_closed,
    parse_llm_json,
    reasoning_fields,
    repair_json,
    validate_answer,
)
from workers.adapters.llm_prompt import (
    ANSWER_PREFIX,
    DEFAULT_MAX_NEW_TOKENS,
    SCORING_LEAD,
    SCORING_SYSTEM,
    SCORING_TEMPLATE,
    TRUNCATION_MARKER,
    USER_TEMPLATE,
    TurnIds,
    build_system_prompt,
    data_file,
    label_continuations,
    load_examples,
    load_verbalizers,
    prompt_frame,
    render_transcript,
    truncate_middle,
    user_turns_body,
)
from workers.adapters.text import conversation_messages
from workers.adapters.turn_selector import Selected, TurnSelector
from workers.adapters.windowed import Reading, Windows, background_indices, reading_output
from workers.windows import build_turn_windows, pool

# Prompts scored in one forward pass (label scoring repeats the instructions' KV
# cache per row and label phrase: 150 rows of one-line prompts took 20 GB on CPU).
ROWS_PER_PASS = 32
DEFAULT_WINDOW_TOKENS = 256  # window_by = "user_turns": longer conversations are read per user turn

__all__ = [
    "ANSWER_PREFIX",
    "CategorySpeller",
    "LLMClassifyAdapter",
    "data_file",
    "json_object_closed",
    "parse_llm_json",
    "reasoning_fields",
    "render_transcript",
    "repair_json",
    "truncate_middle",
    "validate_answer",
]


class LLMClassifyAdapter:
    """Adapter for kind "llm_classify": labels (name -> one-line description) in, the
    JSON contract out (category, confidence, reasoning, key_entities,
    secondary_categories).

    Methods (task option `method`): "score" (default; the module's docstring) or
    "generate" (`workers.adapters.llm_generation`).

    Other options: `calibrate` (default true: the content-free prior is divided out,
    or, with `label_bias` {label: bias} and `temperature`, the fitted scaling is
    applied), `examples` (a labeled JSONL file: rows of {"messages" or "text",
    "label"}; relative paths are under config/data) with `shots`
    (k examples in the prompt, one per label in turn, file order), `secondary_threshold`
    (labels other than the best with at least this probability are listed as
    secondary_categories, default 0.15).
    """

    kind = "llm_classify"

    def __init__(
        self,
        *,
        labels: dict[str, str],
        max_chars: int = 1_000_000,
        method: str = "score",
        calibrate: bool = True,
        reasoning: bool = False,
        examples: str | None = None,
        shots: int = 0,
        verbalizers: str | None = None,
        secondary_threshold: float = 0.15,
        prompt: str = "transcript",
        assistant_tokens: int = 32,
        prompt_tokens: int | None = None,
        temperature: float = 1.0,
        label_bias: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if not labels:
            raise ValueError("llm_classify needs at least one label")
        bad = [name for name in labels if not name or '"' in name or "\\" in name]
        if bad:
            raise ValueError(f"labels may not be empty or contain quotes/backslashes: {bad}")
        if method not in ("score", "generate"):
            raise ValueError(f"llm_classify method must be 'score' or 'generate', got {method!r}")
        if shots < 0:
            raise ValueError(f"shots must be >= 0, got {shots}")
        if prompt not in ("transcript", "user_turns"):
            raise ValueError(f"prompt must be 'transcript' or 'user_turns', got {prompt!r}")
        self.labels = dict(labels)
        self.names = list(self.labels)
        self.max_chars = max_chars
        self.method = method
        self.calibrate = bool(calibrate)
        stray = sorted(set(label_bias or {}) - set(self.labels))
        if stray:
            raise ValueError(f"label_bias names labels the task lacks: {', '.join(stray)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        # The fitted scaling (fleet calibrate), used instead of the content-free prior.
        self.scaling: tuple[float, list[float]] | None = (
            (float(temperature), [float(label_bias.get(n, 0.0)) for n in self.names])
            if label_bias and self.calibrate
            else None
        )
        self.reasoning = bool(reasoning)
        self.examples_path = examples
        self.shots = int(shots) if examples else 0
        self.verbalizers_path = verbalizers
        self.secondary_threshold = float(secondary_threshold)
        self.system_prompt = build_system_prompt(self.labels)
        # prompt "user_turns": the conversation fitted around the user's turns
        # (workers.windows.fit_turns): assistant turns cut to `assistant_tokens`,
        # at most `prompt_tokens` tokens (default: all the room), latest user turns kept first.
        self.prompt = prompt
        # Tier option window_by = "user_turns": a conversation longer than
        # `window_tokens` is scored one user turn at a time (self.reading, set at load).
        self.reading: Reading | None = None
        self.background: tuple[int, ...] = ()
        # Tier option turn_selector: an encoder folder that reads every user turn and
        # picks the one the LLM scores (TurnSelector, set at load).
        self.selector: TurnSelector | None = None
        self.assistant_tokens = int(assistant_tokens)
        self.prompt_tokens = prompt_tokens
        self._model: Any = None
        self._tokenizer: Any = None
        self._tier: TierSpec | None = None
        self._device = "cpu"
        self._prefix_ids: list[int] = []
        self._suffix_ids: list[int] = []
        self._marker_ids: list[int] = []
        self._label_ids: list[list[int]] = []
        self._owners: list[int] = []
        self._json_prefix: list[int] = []
        self._json_after = ""
        self._room = 0
        self._prefix_cache: Any = None
        self._token_strings: list[str] = []
        self._speller: CategorySpeller | None = None
        self._prior: list[float] | None = None
        self._eos_id: int = 0
        self._pad_id: int = 0

    # -- lifecycle ---------------------------------------------------------

    @property
    def max_new_tokens(self) -> int:
        tier = self._tier
        return (
            int(tier.options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
            if tier
            else DEFAULT_MAX_NEW_TOKENS
        )

    @property
    def prior(self) -> dict[str, float] | None:
        """The content-free label distribution divided out by calibration (None when off)."""
        return None if self._prior is None else dict(zip(self.names, self._prior, strict=True))

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        """Load a prepared local folder (never the hub) and precompute prompt pieces.

        A tokenizer with a chat template gets the system/user/assistant turns; one
        without (a base model such as Gemma 3 270M) gets the same text as a plain
        prompt. Configuration problems (tier too short for the instructions, a label the
        vocabulary cannot spell, an unreadable examples file) are raised before the
        weights are loaded. With calibration on, the content-free prior is scored here.
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.unload()
        dtype = resolve_dtype(tier.dtype, str(device).startswith("cuda"))
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        tokenizer.padding_side = "left"
        eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if not isinstance(eos_id, int) or eos_id == tokenizer.unk_token_id:
            eos_id = tokenizer.eos_token_id
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos_id)

        shots = load_examples(self.examples_path, self.labels, self.shots)
        special = tokenizer.chat_template is None  # a plain prompt starts with BOS itself

        def ids(text: str, first: bool = False) -> list[int]:
            return list(tokenizer(text, add_special_tokens=first and special)["input_ids"])

        # The JSON frame: generation (method "generate") and reasoning after scoring.
        before, after = prompt_frame(
            tokenizer,
            self.system_prompt,
            USER_TEMPLATE,
            [(t, f'{{"category": "{lab}"}}') for t, lab in shots],
        )
        json_prefix, json_after = ids(before, True), after
        prefix_ids, suffix_ids = json_prefix, ids(after + ANSWER_PREFIX)
        label_ids: list[list[int]] = []
        owners: list[int] = []
        if self.method == "score":
            phrases = load_verbalizers(self.verbalizers_path, self.labels)
            before, after = prompt_frame(
                tokenizer,
                SCORING_SYSTEM,
                SCORING_TEMPLATE,
                [(t, f"{SCORING_LEAD} {phrases[lab][0]}.") for t, lab in shots],
            )
            prefix_ids, suffix_ids = ids(before, True), ids(after + SCORING_LEAD)
            label_ids, owners = label_continuations(
                tokenizer, [phrases[n] for n in self.names], after + SCORING_LEAD
            )
        marker_ids = ids(TRUNCATION_MARKER)
        reading, background = self.turn_reading(tier)  # refused before the weights load
        max_new = int(tier.options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        fixed = max(len(prefix_ids) + len(suffix_ids), len(json_prefix) + len(ids(json_after)) + 16)
        room = tier.max_length - max_new - fixed
        if room < len(marker_ids) + 32:
            raise ValueError(
                f"tier {tier.name}: max_length {tier.max_length} leaves {room} tokens for the "
                f"conversation after the {fixed}-token instructions "
                f"and {max_new} new tokens; raise max_length, lower max_new_tokens or shots"
            )
        limit = getattr(config, "max_position_embeddings", None)
        if limit and tier.max_length > limit:
            raise ValueError(
                f"tier {tier.name}: max_length {tier.max_length} > model limit {limit}"
            )
        speller = None
        token_strings: list[str] = []
        if self.method == "generate":
            vocab = max(len(tokenizer), int(config.vocab_size))
            token_strings = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            token_strings += [""] * (vocab - len(token_strings))
            speller = CategorySpeller(self.labels, token_strings, set(tokenizer.all_special_ids))

        # The selector encoder loads once every configuration check above has passed,
        # and is dropped again when the LLM's own weights fail to load.
        selector = TurnSelector.from_tier(tier, reading, device)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, local_files_only=True, dtype=getattr(torch, dtype)
            )
            model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' typed wrapper
        except BaseException:
            if selector is not None:
                selector.unload()
            raise

        self.reading, self.background, self.selector = reading, background, selector
        self._model, self._tokenizer, self._tier, self._device = model, tokenizer, tier, str(device)
        self._prefix_ids, self._suffix_ids, self._marker_ids = prefix_ids, suffix_ids, marker_ids
        self._json_prefix, self._json_after = json_prefix, json_after
        self._label_ids, self._owners, self._room = label_ids, owners, room
        self._prefix_cache = (
            prefix_cache_for(model, prefix_ids) if self.method == "score" and prefix_ids else None
        )
        self._token_strings = token_strings
        self._speller = speller
        self._eos_id, self._pad_id = int(eos_id), int(tokenizer.pad_token_id)
        self._prior = None
        if self.method == "score" and self.calibrate and self.scaling is None:
            bodies = [self._body_ids(f"user: {text}".rstrip()) for text in CONTENT_FREE_INPUTS]
            self._prior = mean_distribution(
                [label_distribution(row) for row in self._label_logprobs(bodies)]
            )

    def turn_reading(self, tier: TierSpec) -> tuple[Reading | None, tuple[int, ...]]:
        """The tier's reading of long conversations, and its background label indices.

        Tier options: `window_by` ("user_turns", or absent: one prompt, middle cut
        when it must), `window_tokens` (default 256: a rendered conversation of at
        most this many tokens is one prompt; a longer one is scored one user turn per
        prompt, with the last `turn_context` tokens before it, at most `max_windows`
        turns), `pooling` (a rule of workers.windows, default "margin") and
        `background_labels` (what `margin`, `salient` and `latest` look past).
        Raises ValueError for an unknown option value or background label; "user_turns"
        with method "generate" is refused (generation writes one answer per prompt)."""
        options = tier.options
        window_by = options.get("window_by")
        if window_by is None:
            return None, ()
        if window_by != "user_turns":
            raise ValueError(
                f"llm_classify window_by must be 'user_turns' (or left out), got {window_by!r}"
            )
        if self.method != "score":
            raise ValueError("window_by = 'user_turns' needs method = 'score'")
        reading = Reading.from_options(
            int(options.get("window_tokens", DEFAULT_WINDOW_TOKENS)),
            {"pooling": "margin", **options},
        )
        return reading, background_indices(self.names, options)

    def unload(self) -> None:
        """Drop the model so its memory can be reused by another tier."""
        was_cuda = self._model is not None and self._device.startswith("cuda")
        if self.selector is not None:
            self.selector.unload()
            self.selector = None
        self._model = None
        self._tokenizer = None
        self._speller = None
        self._token_strings = []
        self._tier = None
        self._prior = None
        self._prefix_cache = None
        gc.collect()
        if was_cuda:
            import torch

            torch.cuda.empty_cache()

    # -- per item ----------------------------------------------------------

    def _body_ids(self, transcript: str) -> list[int]:
        # split_special_tokens: text such as "<|im_end|>" in a message stays text and
        # can never close the user turn or open a fake assistant turn.
        return list(
            self._tokenizer(transcript, add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
        )

    def prepare(self, source: Source) -> Prepared:
        """Validate the conversation and build the prompt ids (middle-truncated to fit).

        Payload: {"body": conversation ids, "input_ids": prefix + body + suffix,
        "truncated_tokens": n}. Cost (tokens, for the batch budget): the prompt without
        the shared prefix plus one row per label when scoring; the full prompt plus
        max_new_tokens when generating. Raises InputError for a malformed conversation.
        """
        messages = conversation_messages(source.data, max_chars=self.max_chars)
        if self._tokenizer is None or self._tier is None:
            raise RuntimeError("LLMClassifyAdapter.prepare called before load")
        if self.reading is not None:
            windows = self._turn_windows(messages)
            if windows is not None:
                return self._windowed(source, windows, messages)
        if self.prompt == "user_turns":
            body, dropped = self._user_turns_body(messages)
        else:
            body = self._body_ids(render_transcript(messages))
            body, dropped = truncate_middle(body, self._room, self._marker_ids)
        ids = self._prefix_ids + body + self._suffix_ids
        if self.method == "score":
            cost = self._scoring_cost(body)
            if self.reasoning:
                cost += len(self._json_prefix) + len(ids) + self.max_new_tokens
        else:
            cost = len(ids) + self.max_new_tokens
        notes = {"truncated_tokens": dropped} if dropped else {}
        return Prepared(
            item_id=source.item_id,
            cost=cost,
            payload={"body": body, "input_ids": ids, "truncated_tokens": dropped},
            notes=notes,
        )

    def _turn_windows(self, messages: Sequence[Mapping[str, str]]) -> Windows | None:
        """One body per user turn (`build_turn_windows` over the rendered `role: content`
        lines), or None when the conversation fits `window_tokens` and is read whole."""
        reading = self.reading
        assert reading is not None
        turns = TurnIds.of(messages, self._body_ids)
        newlines = len(turns.newline) * max(len(turns.ids) - 1, 0)
        if sum(len(i) for i in turns.ids) + newlines <= reading.max_length:
            return None
        plan = build_turn_windows(
            turns.counts(),
            size=min(reading.max_length, self._room),
            overlap=min(reading.overlap, reading.max_length // 2),
            context=min(reading.turn_context, reading.max_length // 2),
            max_windows=reading.max_windows,
        )
        return Windows([turns.join(w.segments) for w in plan.windows], plan)

    def _scoring_cost(self, body: Sequence[int]) -> int:
        """Batch cost of scoring one prompt body: the body, the suffix and one row per
        label phrase (the shared prefix is cached)."""
        return (
            len(body)
            + len(self._suffix_ids)
            + len(self._label_ids) * max(len(c) for c in self._label_ids)
        )

    def _windowed(
        self, source: Source, windows: Windows, messages: Sequence[Mapping[str, str]]
    ) -> Prepared:
        """A long conversation read per user turn: every turn scored by the LLM, or with
        a turn selector every turn read by the selector and one scored by the LLM (cost:
        the selector's tokens plus the costliest turn's scoring)."""
        unread = windows.plan.tokens_unread
        payload: dict[str, Any] = {"windows": windows, "truncated_tokens": unread}
        cost = sum(self._scoring_cost(b) for b in windows.ids)
        if self.selector is not None:
            selected = self.selector.windows(messages, self.max_chars)
            payload["selector"] = selected
            cost = max(self._scoring_cost(b) for b in windows.ids) + selected.cost
        return Prepared(
            item_id=source.item_id,
            cost=cost,
            payload=payload,
            notes={"truncated_tokens": unread} if unread else {},
        )

    def _user_turns_body(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], int]:
        """The transcript fitted around the user's turns (`llm_prompt.user_turns_body`)."""
        room = min(self._room, self.prompt_tokens or self._room)
        return user_turns_body(messages, self._body_ids, room, self.assistant_tokens)

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        """Score the labels (or generate, with method "generate") for one sub-batch."""
        if not batch:
            return []
        if self._model is None:
            raise RuntimeError("LLMClassifyAdapter.predict called before load")
        if self.method == "generate":
            results = self._generate(
                [p.payload["input_ids"] for p in batch], [ANSWER_PREFIX] * len(batch), True
            )
            return [
                self._to_prediction(raw, p.payload.get("truncated_tokens", 0), cut)
                for (raw, cut), p in zip(results, batch, strict=True)
            ]
        picks = self._select_turns(batch)
        bodies: list[list[int]] = []
        for p, pick in zip(batch, picks, strict=True):
            w = p.payload.get("windows")
            if pick is not None:
                bodies.append(w.ids[pick.window])
            else:
                bodies += w.ids if w is not None else [p.payload["body"]]
        rows = self._label_logprobs(bodies)
        preds: list[Prediction] = []
        at = 0
        for p, pick in zip(batch, picks, strict=True):
            w = p.payload.get("windows")
            n = len(w.ids) if w is not None and pick is None else 1
            if pick is not None:
                preds.append(self._selected_prediction(rows[at], w, pick))
            elif w is not None:
                preds.append(self._pooled_prediction(rows[at : at + n], w))
            else:
                preds.append(
                    self._scored_prediction(
                        *self.label_distribution(rows[at]), p.payload.get("truncated_tokens", 0)
                    )
                )
            at += n
        if self.reasoning:
            preds = self._add_reasoning(batch, preds)
        return list(preds)

    def label_distribution(self, logprobs: Sequence[float]) -> tuple[list[float], list[float]]:
        """(calibrated, raw) label distributions from one row of label log-probabilities."""
        raw = label_distribution(logprobs)
        if self.scaling is not None:
            t, bias = self.scaling
            top = max(logprobs)
            return label_distribution(
                [(v - top) / t + b for v, b in zip(logprobs, bias, strict=True)]
            ), raw
        return (calibrated(raw, self._prior) if self._prior is not None else raw), raw

    def _label_logprobs(self, bodies: Sequence[Sequence[int]]) -> list[list[float]]:
        """Label log-probabilities (rows x labels), at most ROWS_PER_PASS prompts per
        forward pass: each row repeats the instructions' KV cache once per label
        phrase, so the rows of a sub-batch of long conversations read per user turn
        (dozens per item) are scored a slice at a time."""
        import torch

        out: list[list[float]] = []
        with torch.inference_mode():
            for k in range(0, len(bodies), ROWS_PER_PASS):
                scores = score_continuations(
                    self._model,
                    [list(b) + self._suffix_ids for b in bodies[k : k + ROWS_PER_PASS]],
                    self._label_ids,
                    shared_prefix=self._prefix_ids,
                    prefix_cache=self._prefix_cache,
                    pad_id=self._pad_id,
                )
                out += [
                    per_label_logprobs(row, self._owners, len(self.names))
                    for row in scores.tolist()
                ]
        return out

    def _pooled_prediction(self, rows: Sequence[Sequence[float]], windows: Windows) -> Prediction:
        """One prediction from the label log-probabilities of each user-turn window:
        the calibrated window distributions pooled by the tier's rule; `uncalibrated`
        is the deciding window's."""
        reading = self.reading
        assert reading is not None
        dists = [self.label_distribution(r) for r in rows]
        pooled = pool(
            [d[0] for d in dists], windows.plan, reading.pooling, background=self.background
        )
        pred = self._scored_prediction(
            list(pooled.probs), dists[pooled.deciding][1], windows.plan.tokens_unread
        )
        assert pred.output is not None
        pred.output["reading"] = reading_output(windows, pooled, reading)
        return pred

    def _select_turns(self, batch: Sequence[Prepared]) -> list[Selected | None]:
        """The turn selector's pick for every item read per user turn (None for the
        rest, and for all items without a selector): one forward pass of the selector
        over the sub-batch's turn windows."""
        if self.selector is None:
            return [None] * len(batch)
        chosen = [p.payload.get("selector") for p in batch]
        picks = self.selector.select([c for c in chosen if c is not None])
        out: list[Selected | None] = []
        for p, c in zip(batch, chosen, strict=True):
            if c is None:
                out.append(None)
                continue
            pick = picks.pop(0)
            out.append(pick.at(p.payload["windows"]))
        return out

    def _selected_prediction(
        self, row: Sequence[float], windows: Windows, pick: Selected
    ) -> Prediction:
        """The prediction of the one user turn the selector picked (the LLM's calibrated
        distribution over that turn); the reading records the selector's reading."""
        probs, raw = self.label_distribution(row)
        pred = self._scored_prediction(probs, raw, windows.plan.tokens_unread)
        assert pred.output is not None and self.reading is not None and self.selector is not None
        reading = reading_output(pick.windows, pick.pooled, self.selector.reading)
        reading["selector"] = self.selector.describe(pick)
        reading["deciding_window"] = pick.window  # the LLM's window of that turn
        pred.output["reading"] = reading
        return pred

    def _scored_prediction(
        self, probs: Sequence[float], raw: Sequence[float], truncated: int
    ) -> Prediction:
        """The JSON contract from a calibrated and a raw label distribution."""
        scores = {n: round(p, 6) for n, p in zip(self.names, probs, strict=True)}
        ranked = sorted(self.names, key=lambda n: -scores[n])
        best = ranked[0]
        secondary = [n for n in ranked[1:] if scores[n] >= self.secondary_threshold]
        output = {
            "status": "ok",
            "method": "label_scoring",
            "calibrated": self._prior is not None or self.scaling is not None,
            "calibration": (
                "fitted scaling"
                if self.scaling is not None
                else "content-free prior"
                if self._prior is not None
                else "none"
            ),
            "category": best,
            "confidence": scores[best],
            "reasoning": "",
            "key_entities": [],
            "secondary_categories": secondary,
            "uncalibrated": {n: round(p, 6) for n, p in zip(self.names, raw, strict=True)},
            "field_errors": {},
            "truncated_tokens": truncated,
        }
        return Prediction(label=best, confidence=scores[best], scores=scores, output=output)

    @staticmethod
    def _reasoning_body(prepared: Prepared, pred: Prediction) -> list[int]:
        """What the reasoning is written from: the prompt's conversation, or for an item
        read per user turn the window that decided it."""
        windows = prepared.payload.get("windows")
        if windows is None:
            return list(prepared.payload["body"])
        reading = (pred.output or {}).get("reading", {})
        return list(windows.ids[reading.get("deciding_window", 0)])

    def _add_reasoning(self, batch: list[Prepared], preds: list[Prediction]) -> list[Prediction]:
        """Generate reasoning and key_entities for the fixed categories, one batch."""
        forced = [f'{{"category": "{p.label}", "reasoning": "' for p in preds]
        prompts = [
            self._json_prefix
            + self._reasoning_body(p, pred)
            + self._tokenizer(self._json_after + f, add_special_tokens=False)["input_ids"]
            for p, pred, f in zip(batch, preds, forced, strict=True)
        ]
        results = self._generate(prompts, forced, False)
        out: list[Prediction] = []
        for pred, (raw, cut) in zip(preds, results, strict=True):
            assert pred.output is not None
            output = dict(pred.output)
            extra = reasoning_fields(raw, cut, self.max_new_tokens)
            output.update(extra)
            output["raw"] = raw
            out.append(
                Prediction(
                    label=pred.label, confidence=pred.confidence, scores=pred.scores, output=output
                )
            )
        return out

    def _generate(
        self, prompts: list[list[int]], forced: list[str], constrained: bool
    ) -> list[tuple[str, bool]]:
        """Greedy generation on one left-padded sub-batch (`llm_generation.greedy_generate`):
        (forced prefix + generated text, cut) per row."""
        self._token_strings = self._token_strings or self._tokenizer.batch_decode(
            [[i] for i in range(len(self._tokenizer))]
        )
        return greedy_generate(
            self._model,
            self._tokenizer,
            prompts,
            forced,
            speller=self._speller if constrained else None,
            token_strings=self._token_strings,
            max_new_tokens=self.max_new_tokens,
            eos_id=self._eos_id,
            pad_id=self._pad_id,
            device=self._device,
        )

    def _to_prediction(self, raw: str, truncated: int, cut: bool = False) -> Prediction:
        return generated_prediction(raw, self.labels, truncated, cut, self.max_new_tokens)
