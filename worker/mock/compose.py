"""The bundled upstream's deterministic answers: the plan, its choices and usage, the reply
and the stream events."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from itertools import chain, zip_longest
from typing import Any

import orjson

__all__ = ["Choice", "Plan", "compose", "reply_body", "stream_events"]

_LEXICON = "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike \
november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber"
_VOCAB = tuple(_LEXICON.split())
_SAMPLES: dict[str, Any] = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
_UNITS = re.compile(r"\s*\S+\s*")


@dataclass(slots=True)
class Choice:
    content: str | None
    tool_calls: list[tuple[str, str]]  # (function name, arguments)
    finish_reason: str | None
    refusal: str | None = None


@dataclass(slots=True)
class Plan:
    fault: str | None
    stall: float
    latency: float
    chunks: int = 1
    after: int = 0
    interval: float = 0.0
    reasoning_field: str = "reasoning_content"
    reasoning: str | None = None
    choices: list[Choice] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, Any] | None = None  # the whole answer of an embeddings call
    logprobs: bool = False  # the request's "logprobs": every content piece gets its entry
    audio: bool = False  # "audio" in the request's modalities: the text comes as audio
    usage_choices: bool = True  # False: the usage chunk has no "choices" key at all


def compose(
    body: dict[str, Any], opts: dict[str, Any], digest: bytes, chunks: int
) -> tuple[list[Choice], str | None, dict[str, Any]]:
    """Build the deterministic reply: the choices, the reasoning text and the usage."""
    messages: list[Any] = body["messages"]
    n = max(1, int(body.get("n") or 1))
    reasoning = None
    if body.get("reasoning_effort") or opts.get("reasoning"):
        reasoning = f"Thinking about {len(messages)} messages: " + _words(digest, 3, chunks)
    calls: list[tuple[str, str]] = []
    tools, tool_choice = body.get("tools"), body.get("tool_choice")
    functions = [t["function"] for t in tools if "function" in t] if isinstance(tools, list) else []
    if functions and tool_choice != "none":
        wanted = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        function = next((f for f in functions if f.get("name") == wanted), functions[0])
        for k in range(int(opts.get("tool_calls", 1))):
            word = _VOCAB[(digest[k % len(digest)] + k) % len(_VOCAB)]
            calls.append((str(function["name"]), _arguments(function.get("parameters"), k, word)))
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    choices = []
    for index in range(n):
        if calls:
            choices.append(Choice(None, calls, "tool_calls"))
            continue
        if "refusal" in opts:
            choices.append(Choice(None, [], "stop", refusal=str(opts["refusal"])))
            continue
        if "content" in opts:
            content = str(opts["content"])
        else:
            content = f"Mock reply to {len(messages)} messages: " + _words(
                digest, 5 * index, chunks
            )
        words = content.split()
        if isinstance(limit, int) and 0 < limit < len(words):
            choices.append(Choice(" ".join(words[:limit]), [], "length"))
        else:
            choices.append(Choice(content, [], "stop"))
    prompt = max(1, sum(_content_words(m) for m in messages))
    thought = n * len(reasoning.split()) if reasoning else 0
    # Arguments have no spaces to count, so they are priced like a tokenizer would: ~4 chars each.
    text = sum(
        len((c.content or "").split()) + sum(len(a) // 4 for _, a in c.tool_calls) for c in choices
    )
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": text + thought,
        "total_tokens": prompt + text + thought,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "text_tokens": prompt,
            "audio_tokens": 0,
            "image_tokens": 0,
        },
        "completion_tokens_details": {
            "text_tokens": text,
            "audio_tokens": 0,
            "reasoning_tokens": thought,
        },
    }
    return choices, reasoning, usage


def reply_body(plan: Plan, base: dict[str, Any]) -> dict[str, Any]:
    """The non-streamed ``chat.completion``: ``base`` with the plan's choices and usage."""
    rows = []
    for index, choice in enumerate(plan.choices):
        message: dict[str, Any] = {"role": "assistant", "content": choice.content}
        if choice.refusal is not None:
            message["refusal"] = choice.refusal
        if plan.audio and choice.content is not None:
            message["content"] = None
            message["audio"] = _audio(index, choice.content)
        if plan.reasoning is not None:
            message[plan.reasoning_field] = plan.reasoning
        if choice.tool_calls:
            message["tool_calls"] = [
                {"id": f"call_{k}", "type": "function", "function": {"name": n, "arguments": a}}
                for k, (n, a) in enumerate(choice.tool_calls)
            ]
        finish = None if plan.fault == "no_finish_reason" else choice.finish_reason
        row = {"index": index, "message": message, "finish_reason": finish}
        if plan.logprobs:
            row["logprobs"] = {"content": [_logprob(choice.content or "")], "refusal": None}
        rows.append(row)
    return {**base, "choices": rows, "usage": plan.usage}


def stream_events(plan: Plan, base: dict[str, Any]) -> list[bytes]:
    """The streamed answer's ``data:`` events, in order (``[DONE]`` apart): the choices
    interleaved, then the usage chunk when ``base`` has a ``usage`` key."""

    def event(
        index: int,
        delta: dict[str, Any],
        finish: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    def text_event(index: int, text: str, field: str) -> bytes:
        if field == "audio":
            # As OpenAI streams audio: the id and expiry once, then data with its transcript.
            audio = _audio(index, text)
            if not first_audio[index]:
                audio = {"data": audio["data"], "transcript": text}
            first_audio[index] = False
            return event(index, {"audio": audio})
        if not plan.logprobs:
            return event(index, {field: text})
        entry = _logprob(text)
        key = "refusal" if field == "refusal" else "content"
        return event(
            index, {field: text}, logprobs={"content": None, "refusal": None, key: [entry]}
        )

    first_audio = [True] * len(plan.choices)
    lanes: list[list[bytes]] = []
    thoughts = _split(plan.reasoning or "", plan.chunks)
    truncated = plan.fault in ("no_finish_reason", "truncated")
    for index, choice in enumerate(plan.choices):
        if choice.refusal is not None:
            lane = [event(index, {"role": "assistant", "content": None, "refusal": ""})]
        elif choice.tool_calls or plan.audio:
            lane = [event(index, {"role": "assistant", "content": None})]
        else:
            lane = [event(index, {"role": "assistant", "content": ""})]
        lane += [event(index, {plan.reasoning_field: piece}) for piece in thoughts]
        field = "audio" if plan.audio else "content"
        lane += [text_event(index, p, field) for p in _split(choice.content or "", plan.chunks)]
        lane += [text_event(index, p, "refusal") for p in _split(choice.refusal or "", plan.chunks)]
        for k, (name, arguments) in enumerate(choice.tool_calls):
            head = {"name": name, "arguments": ""}
            fragments: list[dict[str, Any]] = [
                {"id": f"call_{k}", "type": "function", "function": head}
            ]
            fragments += [{"function": {"arguments": piece}} for piece in _split(arguments, 3)]
            lane += [event(index, {"tool_calls": [{"index": k, **f}]}) for f in fragments]
        if not truncated:
            lane.append(event(index, {}, choice.finish_reason))
        lanes.append(lane)
    # Choices interleave step by step, as real servers send them.
    events = [e for e in chain.from_iterable(zip_longest(*lanes)) if e is not None]
    if "usage" in base:
        last = {**base, "choices": [], "usage": plan.usage}
        if not plan.usage_choices:
            del last["choices"]
        events.append(b"data: " + orjson.dumps(last) + b"\n\n")
    return events


def _logprob(text: str) -> dict[str, Any]:
    return {"token": text, "logprob": -0.25, "bytes": list(text.encode()), "top_logprobs": []}


def _audio(index: int, transcript: str) -> dict[str, Any]:
    """An audio part: the transcript, and "audio" bytes standing for it (base64); its id
    depends on the text only, so that the same request gets the same answer."""
    digest = hashlib.blake2b(transcript.encode(), digest_size=6).hexdigest()
    return {
        "id": f"audio_{digest}_{index}",
        "data": base64.b64encode(transcript.encode()).decode(),
        "expires_at": 1_900_000_000,
        "transcript": transcript,
    }


def _words(digest: bytes, start: int, chunks: int) -> str:
    count = max(chunks, 12)
    picks = (_VOCAB[(digest[(start + i) % len(digest)] + i) % len(_VOCAB)] for i in range(count))
    return " ".join(picks)


def _arguments(parameters: Any, k: int, word: str) -> str:
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(properties, dict) or not properties:
        return orjson.dumps({"call": k, "topic": word}).decode()
    args = {}
    for name, spec in properties.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        args[name] = _SAMPLES.get(kind, word) if isinstance(kind, str) else word
    return orjson.dumps(args).decode()


def _content_words(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        texts = (part.get("text") for part in content if isinstance(part, dict))
        return sum(len(text.split()) for text in texts if isinstance(text, str))
    return 0


def _split(text: str, parts: int) -> list[str]:
    """Split text into `parts` non-empty pieces (fewer when it is shorter), keeping words whole."""
    units: list[str] = _UNITS.findall(text)
    if len(units) < parts or "".join(units) != text:
        units = list(text)
    size, parts = len(units), min(parts, len(units))
    return ["".join(units[i * size // parts : (i + 1) * size // parts]) for i in range(parts)]
