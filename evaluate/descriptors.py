"""Class descriptors: DCLIP / CuPL JSON files ``{class name: [descriptor, ...]}`` matched to a dataset's classes.

* :func:`read_descriptor_json` reads a file and refuses duplicate keys (plain ``json.load`` keeps the last one
  silently) and values that are not lists of strings.
* :func:`align_descriptors` returns the descriptor lists in CLASS ORDER (index = label) whatever the key order of
  the file: names match exactly first, then by :func:`normalise_name`; ambiguities, duplicated class names, missing
  classes, extra keys and empty lists are errors that name the classes (the last three can be relaxed).
* :func:`descriptor_sentence` turns (class, descriptor) into a DCLIP-style prompt
  ``"a photo of a tench, which is a freshwater fish."``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Descriptors starting with one of these words read as "which is …" ("which is a large bird").
_IS_WORDS = frozenset({"a", "an", "the", "used"})
#: Descriptors starting with one of these words follow "which" directly ("which has …", "which often …").
_VERB_WORDS = frozenset(
    {
        "has", "have", "had", "often", "typically", "usually", "generally", "sometimes", "always", "may", "might",
        "can", "could", "will", "would", "is", "are", "was", "were", "lives", "live", "found", "tends", "looks",
        "appears", "comes", "consists", "contains", "features", "resembles", "shows", "displays",
    }
)


#: The authors' 46 prompt templates (``evaluate.template_set: paper46``; their dataloaders/clip_prompts.py), in
#: their order and in grain's template form ("{c}", a final period). Their list appends ", a type of bird" to 23 of
#: them — CUB's domain, kept for every dataset they evaluate; grain drops it (a bug for any dataset but birds).
#: Their global class embedding averages every template × every DCLIP descriptor sentence without re-normalising
#: (``evaluate.description_templates: all``, ``evaluate.renormalize: false``).
PAPER_TEMPLATES: tuple[str, ...] = tuple(f"{t}." for t in (
    "a bad photo of a {c}", "a photo of many {c}", "a photo of the hard to see {c}",
    "a low resolution photo of the {c}", "a rendering of a {c}", "a bad photo of the {c}",
    "a cropped photo of the {c}", "a photo of a hard to see {c}", "a bright photo of a {c}",
    "a photo of a clean {c}", "a photo of a dirty {c}", "a drawing of a {c}", "a photo of my {c}",
    "a photo of the cool {c}", "a close-up photo of a {c}", "a black and white photo of the {c}",
    "a painting of the {c}", "a painting of a {c}", "a bright photo of the {c}", "a cropped photo of a {c}",
    "a plastic {c}", "a photo of the dirty {c}", "a jpeg corrupted photo of a {c}", "a blurry photo of the {c}",
    "a photo of the {c}", "a good photo of the {c}", "a rendering of the {c}", "a {c} in a video game",
    "a photo of one {c}", "a close-up photo of the {c}", "a photo of a {c}", "a low resolution photo of a {c}",
    "a rendition of the {c}", "a photo of the clean {c}", "a rendition of a {c}", "a photo of a nice {c}",
    "a photo of a weird {c}", "a blurry photo of a {c}", "a good photo of a {c}", "a plushie {c}",
    "a photo of the nice {c}", "a photo of the weird {c}", "a photo of the large {c}", "a toy {c}",
    "itap of my {c}", "a photo of a cool {c}",
))


def read_descriptor_json(path: str | Path) -> dict[str, list[str]]:
    """``{class name: [descriptor, ...]}`` from a DCLIP/CuPL JSON file, keys in file order.

    Raises ValueError naming the file and key for a duplicate key (at any level), naming the class for a value
    that is not a list of strings, and naming the file for invalid JSON or a top level that is not an object.
    """
    path = Path(path)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"{path}: duplicate key {key!r} (JSON keeps only the last; merge or rename them)")
            out[key] = value
        return out

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{class name: [descriptors]}}, got {type(data).__name__}")
    for name, value in data.items():
        if not isinstance(value, list):
            raise ValueError(f"{path}: class {name!r} maps to {type(value).__name__}, not a list of strings")
        for k, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(f"{path}: class {name!r} descriptor {k} is {type(item).__name__} {item!r}, not a string")
    return data


def normalise_name(name: str) -> str:
    """The form used for fuzzy matching: lowercase, ``_``/``-`` → space, whitespace collapsed and stripped."""
    return " ".join(re.sub(r"[_\-]", " ", name.lower()).split())


def _listing(items: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)}: {shown}{more}"


def align_descriptors(
    classnames: Sequence[str],
    descriptors: Mapping[str, Sequence[str]],
    *,
    on_missing: str = "error",
    on_extra: str = "error",
    on_empty: str = "error",
    where: str = "descriptors",
) -> list[list[str]]:
    """Descriptor lists in class order (``out[label]``), whatever the key order of ``descriptors``.

    Matching: a class takes the key equal to its name; classes still unmatched take the remaining key whose
    :func:`normalise_name` equals theirs (``"Golden_Retriever"`` ↔ ``"golden retriever"``). Descriptors are
    stripped and blank ones dropped.

    Raises ValueError (each message starts with ``where``):

    * a class name that occurs twice in ``classnames`` (ImageNet's two "crane"s), naming it and both indices:
      rename one (e.g. "crane (bird)") so each class can have its own descriptors;
    * an ambiguity: a key whose normalised form matches several classes, or a class that two keys match;
    * missing classes (count + first 10), unless ``on_missing="empty"`` (they get ``[]``);
    * keys that match no class (count + first 10), unless ``on_extra="ignore"``;
    * classes whose list is empty after stripping, unless ``on_empty="names"`` (they get ``[]``; the caller
      falls back to the class name, e.g. with :func:`descriptor_prompts`).
    """
    if on_missing not in ("error", "empty"):
        raise ValueError(f"on_missing must be 'error' or 'empty', got {on_missing!r}")
    if on_extra not in ("error", "ignore"):
        raise ValueError(f"on_extra must be 'error' or 'ignore', got {on_extra!r}")
    if on_empty not in ("error", "names"):
        raise ValueError(f"on_empty must be 'error' or 'names', got {on_empty!r}")
    names = list(classnames)
    positions: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise ValueError(f"{where}: class {i} name {n!r} is not a string")
        positions.setdefault(n, []).append(i)
    for n, idx in positions.items():
        if len(idx) > 1:
            raise ValueError(
                f"{where}: class name {n!r} occurs {len(idx)} times in classnames (indices {idx}); rename them "
                f"so each can be given its own descriptors"
            )

    matched: dict[int, str] = {}  # class index -> key
    for key in descriptors:
        if key in positions:
            matched[positions[key][0]] = key
    by_norm: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        by_norm.setdefault(normalise_name(n), []).append(i)

    extra: list[str] = []
    # Sorted, so which key is reported first (and the outcome) never depends on the key order of the file.
    for key in sorted(k for k in descriptors if k not in positions):
        candidates = by_norm.get(normalise_name(key), [])
        if not candidates:
            extra.append(key)
            continue
        if len(candidates) > 1:
            raise ValueError(
                f"{where}: key {key!r} matches several classes after normalisation: "
                + ", ".join(f"{names[c]!r} (index {c})" for c in candidates)
            )
        c = candidates[0]
        if c in matched:
            raise ValueError(
                f"{where}: class {names[c]!r} (index {c}) is matched by two keys, {matched[c]!r} and {key!r}; "
                f"keep one"
            )
        matched[c] = key

    missing = [names[i] for i in range(len(names)) if i not in matched]
    if missing and on_missing == "error":
        raise ValueError(f"{where}: no descriptors for {_listing(missing)} of {len(names)} classes")
    if extra and on_extra == "error":
        raise ValueError(f"{where}: keys that match no class ({_listing(extra)}); on_extra='ignore' to allow")

    out: list[list[str]] = []
    empty: list[str] = []
    for i, n in enumerate(names):
        if i not in matched:
            out.append([])
            continue
        values = descriptors[matched[i]]
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise ValueError(f"{where}: class {n!r} maps to {type(values).__name__}, not a list of strings")
        kept = []
        for k, d in enumerate(values):
            if not isinstance(d, str):
                raise ValueError(f"{where}: class {n!r} descriptor {k} is {type(d).__name__} {d!r}, not a string")
            if d.strip():
                kept.append(d.strip())
        if not kept:
            empty.append(n)
        out.append(kept)
    if empty and on_empty == "error":
        raise ValueError(f"{where}: empty descriptor lists for {_listing(empty)}; on_empty='names' falls back to the names")
    return out


def _fill(template: str, classname: str) -> str:
    if "{c}" not in template:
        raise ValueError(f"template {template!r} does not contain '{{c}}'")
    return template.replace("{c}", classname)


def composed_sentence(descriptors: Sequence[str]) -> str:
    """All of a class's descriptors in one sentence, without the class name — the ``composed`` mode's text:
    ``["an orange head", "a blue tail."]`` → ``"an orange head and a blue tail."`` (``"a, b and c."`` for more).
    A text tower that binds words to each other can tell classes apart through it whose descriptors differ only
    in which attribute goes with which part. Blank descriptors are skipped; ValueError when none is left."""
    parts = [d.strip().rstrip(".").strip() for d in descriptors]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError("composed_sentence needs at least one non-blank descriptor")
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + "."


def descriptor_sentence(classname: str, descriptor: str, template: str = "a photo of a {c}.") -> str:
    """A DCLIP-style prompt: ``"<template with the class, no final period>, which <is|has|-> <descriptor>."``.

    The linking word depends on the descriptor's first word: an article (a/an/the) or "used" → ``"which is"``
    ("which is a large bird", "which is used for cutting"); a verb or adverb such as has/have/often/typically/
    may/can/is/are → ``"which"`` alone ("which often lives near water"); anything else (a noun phrase) →
    ``"which has"`` ("which has long ears"). A trailing period of the descriptor is dropped; the sentence ends
    with one. Raises ValueError for a blank descriptor or a template without ``{c}``.
    """
    text = descriptor.strip().rstrip(".").strip()
    if not text:
        raise ValueError(f"blank descriptor for class {classname!r}")
    base = _fill(template, classname).strip()
    while base.endswith("."):
        base = base[:-1].rstrip()
    first = text.split()[0].lower().strip(",;:")
    if first in _IS_WORDS:
        link = "which is"
    elif first in _VERB_WORDS:
        link = "which"
    else:
        link = "which has"
    return f"{base}, {link} {text}."


def descriptor_prompts(
    classnames: Sequence[str], aligned: Sequence[Sequence[str]], template: str = "a photo of a {c}."
) -> list[list[str]]:
    """Per class, the :func:`descriptor_sentence` of each descriptor, or ``[template with the name]`` when the
    class has none (the fallback of ``on_missing="empty"`` / ``on_empty="names"``)."""
    if len(classnames) != len(aligned):
        raise ValueError(f"{len(classnames)} classnames but {len(aligned)} descriptor lists")
    out = []
    for name, descs in zip(classnames, aligned):
        if descs:
            out.append([descriptor_sentence(name, d, template) for d in descs])
        else:
            out.append([_fill(template, name)])
    return out
