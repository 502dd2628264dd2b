"""Parse MLLM replies into clean descriptions and captions. Pure functions that never raise on model output.

A reply may be a dash/number/bullet list, prose, JSON (a list, or an object holding one), markdown, an echo of the
prompt, degenerate repetition, or garbage. ``parse_descriptions`` turns any of it into at most K short,
deduplicated phrases; ``parse_caption`` into one sentence or None.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*(.*?)```", re.S)
_BULLET = re.compile(r"^\s*(?:[-*•·●▪◦–—+>]+|\(?\d{1,3}[.):\]]|\(?[a-zA-Z][.)]\s|#{1,6})\s*")
_LABEL = re.compile(r"^\s*(?:feature|description|part|item|caption|answer|sentence)s?\s*\d*\s*[:=-]\s*", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])|;\s+")
_MARKUP = re.compile(r"\*\*|__|`|<[^>]{1,20}>")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]")
_FILLER = re.compile(r"^(?:sure|certainly|of course|okay|ok|absolutely|great)\b", re.I)
_JSON_KEYS = ("descriptions", "description", "features", "feature", "parts", "attributes", "items", "regions", "answer")
_MIN_LETTERS = 2
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_descriptions(reply: str | None, max_items: int = 10, max_chars: int = 120, prompt: str | None = None) -> list[str]:
    """At most ``max_items`` short visual descriptions from a free-form reply.

    Bullets, numbering, markdown and surrounding quotes are stripped; header lines ("Here are the features:"),
    prompt echoes and lines with too few letters are dropped; runs of a repeated word or phrase are collapsed; each
    item is cut to ``max_chars`` at a word boundary; duplicates (case-insensitive) are removed, first kept.
    """
    if not reply or not isinstance(reply, str):
        return []
    try:
        items = _from_json(reply)
        if items is None:
            items = _from_text(reply)
        return _clean(items, max_items, max_chars, prompt)
    except Exception:  # noqa: BLE001 - the contract is "never raises on model output"; an unseen shape yields nothing
        return []


def parse_caption(reply: str | None, max_chars: int = 300, prompt: str | None = None) -> str | None:
    """One caption sentence from a reply, or None when nothing usable is left."""
    if not reply or not isinstance(reply, str):
        return None
    try:
        text = _unfence(reply)
        parsed = _json_value(text)
        if isinstance(parsed, dict):
            parsed = next((parsed[k] for k in ("caption", "sentence", "description", "answer") if isinstance(parsed.get(k), str)), None)
        if isinstance(parsed, str):
            text = parsed
        lines = [_strip_line(line) for line in text.splitlines() if not _is_header(line)]
        lines = [line for line in lines if line and not _is_echo(line, prompt)]
        if not lines:
            return None
        caption = _collapse_repeats(lines[0])
        caption = _cut(caption, max_chars)
        return caption if _letters(caption) >= _MIN_LETTERS else None
    except Exception:  # noqa: BLE001 - never raises on model output
        return None


# ------------------------------------------------------------------------------------------------ internals


def _unfence(text: str) -> str:
    fenced = _FENCE.findall(text)
    return "\n".join(fenced) if fenced else text


def _json_value(text: str) -> Any:
    text = text.strip()
    if not text or text[0] not in "[{\"":
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        return None


def _from_json(reply: str) -> list[str] | None:
    text = _unfence(reply).strip()
    value = _json_value(text)
    if value is None:
        if text[:1] in "[{":  # JSON cut off by the token budget: salvage its complete strings
            salvaged = _QUOTED.findall(text)
            return salvaged or None
        return None
    return list(_strings(value))


def _strings(value: Any, depth: int = 0) -> Iterable[str]:
    """Strings found in a JSON value: list items, the values of the usual keys, ``{"text": …}`` objects."""
    if depth > 4:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, depth + 1)
    elif isinstance(value, dict):
        keys = [k for k in _JSON_KEYS + ("text", "name", "phrase") if k in value]
        if keys:
            for k in keys:
                yield from _strings(value[k], depth + 1)
        else:  # {"head": "red and striped", …}: join key and value
            for k, v in value.items():
                if isinstance(v, str):
                    yield f"{k}: {v}" if len(v.split()) < 2 else v


def _from_text(reply: str) -> list[str]:
    text = _unfence(reply)
    lines = [line for line in text.splitlines() if line.strip()]
    bulleted = sum(1 for line in lines if _BULLET.match(line))
    if len(lines) == 1 or bulleted == 0:
        # prose: one item per sentence or semicolon clause
        return [part for line in lines for part in _SENTENCE.split(line)]
    # a list, maybe with a preamble and an epilogue: keep the list lines and any line that continues one
    return lines


def _strip_line(line: str) -> str:
    line = _MARKUP.sub("", _CONTROL.sub(" ", line))
    previous = None
    while previous != line:  # "1. - **a red head**" has several layers
        previous = line
        line = _BULLET.sub("", line, count=1)
        line = _LABEL.sub("", line, count=1)
    line = line.strip().strip("\"'“”‘’").strip()
    line = re.sub(r"\s+", " ", line)
    return line.rstrip(" .,;:!")


def _collapse_repeats(text: str) -> str:
    """Collapse immediate repetitions of a 1–4 word unit ("red red red head" → "red head")."""
    words = text.split()
    for size in range(1, 5):
        out: list[str] = []
        i = 0
        while i < len(words):
            unit = words[i : i + size]
            out.extend(unit)
            j = i + size
            while len(unit) == size and [w.lower() for w in words[j : j + size]] == [w.lower() for w in unit]:
                j += size
            i = j
        words = out
    return " ".join(words)


def _letters(text: str) -> int:
    return sum(ch.isalpha() for ch in text)


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1].rsplit(" ", 1)[0] if " " in text[:max_chars] else text[:max_chars]
    return cut[:max_chars].rstrip(" ,;:-")


def _is_header(line: str) -> bool:
    """A line that introduces content rather than being content: "Here are the features:", "Sure!"."""
    text = _MARKUP.sub("", line).strip()
    if text.endswith(":"):
        return True
    return bool(_FILLER.match(text)) and len(text.split()) <= 8 and not _BULLET.match(line)


def _is_echo(line: str, prompt: str | None) -> bool:
    if not prompt:
        return False
    a = re.sub(r"\W+", " ", line).strip().lower()
    b = re.sub(r"\W+", " ", prompt).strip().lower()
    return len(a) >= 12 and (a in b or (b in a and len(b) >= 12))


def _clean(items: Iterable[str], max_items: int, max_chars: int, prompt: str | None) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for raw in items:
        if not isinstance(raw, str):
            continue
        if _is_header(raw):
            continue
        line = _strip_line(raw)
        if not line or _is_echo(line, prompt):
            continue
        line = _collapse_repeats(line)
        if _letters(line) < _MIN_LETTERS or _mostly_repeated(line):
            continue
        line = _cut(line, max_chars)
        key = line.casefold()
        if key in seen:
            continue
        seen.add(key)
        out.append(line)
        if len(out) >= max_items:
            break
    return out


def _mostly_repeated(line: str) -> bool:
    """Degenerate text that survived collapsing (e.g. alternating tokens): few distinct words among many."""
    words = line.lower().split()
    return len(words) >= 6 and len(set(words)) / len(words) < 0.45
