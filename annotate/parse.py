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
#: A reply's own voice rather than content: refusals and apologies, and closing remarks.
_REFUSAL = re.compile(r"^(?:i'?m sorry|i am sorry|sorry\b|i apologi[sz]e|apologies|unfortunately,? i\b|i (?:cannot|can'?t|"
                      r"am unable|'m unable|am not able|won'?t be able)|as an ai\b)", re.I)
_CLOSING = re.compile(r"^(?:let me know|please let me know|feel free|i hope (?:this|that)|hope (?:this|that) helps|"
                      r"if you (?:have|need|would like|want)|is there anything|would you like|do you (?:want|need)|"
                      r"happy to help|glad to help)\b", re.I)
#: "**Beak**: a short, curved orange beak": a short label (1-4 words) before a colon, marked as a label by bold or
#: by the line being a list item.
_BOLD_LABEL = re.compile(r"^\s*(?:[-*•·●▪◦–—+>]+\s*|\(?\d{1,3}[.):\]]\s*)?(?:\*\*|__)([^*_:\n]{1,40})(?:\*\*|__)\s*[:\-–—]\s*")
_ITEM_LABEL = re.compile(r"^([A-Za-z][\w' /-]{0,30}?)\s*:\s+")
#: "Rewritten caption: A small bird …", "Here is the rewritten caption: …": a caption reply's own label.
_CAPTION_LABEL = re.compile(r"^\s*(?:(?:here(?:'s| is) )?(?:the |a |my )?(?:rewritten|new|revised|improved|final|"
                            r"updated|better)?\s*(?:caption|sentence|description)(?: would be| is)?\s*[:=\-–—]\s*)", re.I)


#: Why the parser dropped a piece of a reply (:func:`parse_report`; the describe summary counts them).
DROP_REASONS = ("preamble", "closing", "refusal", "echo", "too_short", "repetition", "duplicate", "over_limit")


def parse_descriptions(reply: str | None, max_items: int = 10, max_chars: int = 120, prompt: str | None = None) -> list[str]:
    """At most ``max_items`` short visual descriptions from a free-form reply.

    Bullets, numbering, markdown and surrounding quotes are stripped, and so is a label before a colon ("**Beak**:
    a short, curved orange beak" → "a short, curved orange beak"); header lines ("Here are the features:"),
    closing remarks ("Let me know if you need more detail."), refusals and apologies ("I'm sorry, but I can't …"),
    prompt echoes and lines with too few letters are dropped; runs of a repeated word or phrase are collapsed; each
    item is cut to ``max_chars`` at a word boundary; duplicates (case-insensitive) are removed, first kept.
    """
    return parse_report(reply, max_items, max_chars, prompt)[0]


def parse_report(reply: str | None, max_items: int = 10, max_chars: int = 120,
                 prompt: str | None = None) -> tuple[list[str], dict[str, int]]:
    """:func:`parse_descriptions` and what it dropped: ``(items, {reason: count})`` (reasons: :data:`DROP_REASONS`)."""
    dropped: dict[str, int] = {}
    if not reply or not isinstance(reply, str):
        return [], dropped
    try:
        items = _from_json(reply)
        if items is None:
            items = _from_text(reply)
        return _clean(items, max_items, max_chars, prompt, dropped), dropped
    except Exception:  # noqa: BLE001 - the contract is "never raises on model output"; an unseen shape yields nothing
        return [], dropped


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
        lines = [_strip_line(_CAPTION_LABEL.sub("", _MARKUP.sub("", line), count=1)) for line in text.splitlines()
                 if not _is_header(line) and _voice(line) is None]
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


def _voice(line: str) -> str | None:
    """"refusal" or "closing" when a line is the model speaking about the task rather than describing the image."""
    text = _BULLET.sub("", _MARKUP.sub("", line).strip(), count=1).strip().strip("\"'“”‘’")
    if _REFUSAL.match(text):
        return "refusal"
    if _CLOSING.match(text):
        return "closing"
    return None


def _redundant(label: str, value: str) -> bool:
    """Whether ``value`` already names what ``label`` names (its last word, singular or plural): "Beak" in "a
    short, curved orange beak". Only then is the label dropped: "Tail: long and blue" keeps its noun."""
    words = re.findall(r"[a-z]+", label.lower())
    if not words or len(words) > 4 or len(value.split()) < 2:
        return False
    head = words[-1].rstrip("s")
    return any(w.rstrip("s") == head for w in re.findall(r"[a-z]+", value.lower()))


def _drop_label(line: str) -> str:
    """A bold label before a colon ("**Beak**: a short, curved orange beak") removed when the text after it names
    the same thing; otherwise kept as plain text ("Tail: striped")."""
    bold = _BOLD_LABEL.match(line)
    if bold and _redundant(bold.group(1), line[bold.end():]):
        return line[bold.end():]
    return line


def _strip_line(line: str) -> str:
    line = _drop_label(_CONTROL.sub(" ", line))
    line = _MARKUP.sub("", line)
    previous = None
    while previous != line:  # "1. - **a red head**" has several layers
        previous = line
        line = _BULLET.sub("", line, count=1)
        line = _LABEL.sub("", line, count=1)
    plain = _ITEM_LABEL.match(line)  # "Beak: a short, curved beak" (bullets already stripped)
    if plain and _redundant(plain.group(1), line[plain.end():]):
        line = line[plain.end():]
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


def _clean(items: Iterable[str], max_items: int, max_chars: int, prompt: str | None,
           dropped: dict[str, int] | None = None) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    drop = dropped if dropped is not None else {}

    def count(reason: str) -> None:
        drop[reason] = drop.get(reason, 0) + 1

    for raw in items:
        if not isinstance(raw, str):
            continue
        if _is_header(raw):
            count("preamble")
            continue
        voice = _voice(raw)
        if voice is not None:
            count(voice)
            continue
        line = _strip_line(raw)
        if not line:
            continue
        if _is_echo(line, prompt):
            count("echo")
            continue
        line = _collapse_repeats(line)
        if _letters(line) < _MIN_LETTERS:
            count("too_short")
            continue
        if _mostly_repeated(line):
            count("repetition")
            continue
        line = _cut(line, max_chars)
        key = line.casefold()
        if key in seen:
            count("duplicate")
            continue
        if len(out) >= max_items:
            count("over_limit")
            continue
        seen.add(key)
        out.append(line)
    return out


def _mostly_repeated(line: str) -> bool:
    """Degenerate text that survived collapsing (e.g. alternating tokens): few distinct words among many."""
    words = line.lower().split()
    return len(words) >= 6 and len(set(words)) / len(words) < 0.45
