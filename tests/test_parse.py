"""Reply parsing: at least 20 reply shapes, adversarial ones included; the parser never raises."""

from __future__ import annotations

import random
import string

import pytest

from grain.annotate.parse import parse_caption, parse_descriptions
from grain.config import DEFAULT_DESCRIBE_PROMPT as PROMPT

SHAPES = [
    ("dash list", "- a red head\n- a striped tail\n- a blue body", ["a red head", "a striped tail", "a blue body"]),
    ("star list", "* a red head\n* a striped tail", ["a red head", "a striped tail"]),
    ("unicode bullets", "• a red head\n• a striped tail\n◦ white dots", ["a red head", "a striped tail", "white dots"]),
    ("numbered dot", "1. a red head\n2. a striped tail\n10. a blue body", ["a red head", "a striped tail", "a blue body"]),
    ("numbered paren", "1) a red head\n(2) a striped tail", ["a red head", "a striped tail"]),
    ("lettered", "a) a red head\nb) a striped tail", ["a red head", "a striped tail"]),
    ("preamble and epilogue", "Here are the visual features:\n- a red head\n- a striped tail", ["a red head", "a striped tail"]),
    ("filler", "Sure! Here you go.\n- a red head", ["a red head"]),
    ("markdown bold", "- **Head:** red and round\n- **Tail**: striped", ["Head: red and round", "Tail: striped"]),
    ("markdown headers", "### Features\n- a red head\n### Colours\n- blue", ["Features", "a red head", "Colours", "blue"]),
    ("prose sentences", "The bird has a red head. Its tail is striped. The body is blue!",
     ["The bird has a red head", "Its tail is striped", "The body is blue"]),
    ("semicolons", "a red head; a striped tail; a blue body", ["a red head", "a striped tail", "a blue body"]),
    ("json list", '["a red head", "a striped tail"]', ["a red head", "a striped tail"]),
    ("json object", '{"descriptions": ["a red head", "a blue body"]}', ["a red head", "a blue body"]),
    ("json list of objects", '[{"text": "a red head"}, {"text": "a blue body"}]', ["a red head", "a blue body"]),
    ("fenced json", '```json\n["a red head", "a blue body"]\n```', ["a red head", "a blue body"]),
    ("fenced list", "```\n- a red head\n- a blue body\n```", ["a red head", "a blue body"]),
    ("quoted items", "- \"a red head\"\n- 'a blue body'", ["a red head", "a blue body"]),
    ("trailing punctuation", "- a red head.\n- a blue body;", ["a red head", "a blue body"]),
    ("duplicates any case", "- a red head\n- A Red Head\n- a red head.", ["a red head"]),
    ("blank lines and spaces", "\n\n  -   a   red    head  \n\n- a blue body\n\n", ["a red head", "a blue body"]),
    ("repeated tokens", "red red red red red red red red red red head", ["red head"]),
    ("repeated phrase", "a red head a red head a red head a red head", ["a red head"]),
    ("degenerate alternation", "ab cd ab cd ab ef ab cd ab cd ab cd ab", []),
    ("prompt echo", PROMPT + "\n- a red head", ["a red head"]),
    ("symbols only", "- ---\n- ***\n- 1234\n- ?!", []),
    ("empty", "", []),
    ("whitespace", "   \n\t ", []),
    ("label prefixes", "Feature 1: a red head\nFeature 2: a blue body", ["a red head", "a blue body"]),
    ("control characters", "- a red\x02 head\u200b\n- a\x00blue body", ["a red head", "a blue body"]),
    ("html-ish tags", "<|im_start|>- a red head<|im_end|>", ["a red head"]),
    ("truncated json", '["a red head", "a blue bo', ["a red head"]),
    ("json object of parts", '{"head": "red", "tail": "striped and long"}', ["head: red", "striped and long"]),
]


def test_there_are_at_least_twenty_shapes():
    assert len(SHAPES) >= 20


@pytest.mark.parametrize("reply, expected", [(r, e) for _, r, e in SHAPES], ids=[n for n, _, _ in SHAPES])
def test_reply_shapes(reply, expected):
    assert parse_descriptions(reply, prompt=PROMPT) == expected


def test_max_items_and_max_chars():
    reply = "\n".join(f"- feature number {i} " + "word " * 40 for i in range(30))
    out = parse_descriptions(reply, max_items=10, max_chars=50)
    assert len(out) == 10
    assert all(len(d) <= 50 for d in out)
    assert all(not d.endswith(" ") for d in out)
    assert out[0].startswith("feature number 0 word")


def test_overlong_single_word_is_cut():
    assert parse_descriptions("x" * 500, max_chars=20) == ["x" * 20]


@pytest.mark.parametrize("junk", [None, 123, b"bytes", ["list"], {"a": 1}])
def test_non_string_replies(junk):
    assert parse_descriptions(junk) == []  # type: ignore[arg-type]
    assert parse_caption(junk) is None  # type: ignore[arg-type]


def test_never_raises_on_random_text():
    rng = random.Random(0)
    alphabet = string.printable + "•◦–—“”‘’{}[]\"\\\x00\u200b日本"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        out = parse_descriptions(text, max_items=5, max_chars=30)
        assert isinstance(out, list) and len(out) <= 5 and all(isinstance(d, str) and 0 < len(d) <= 30 for d in out)
        caption = parse_caption(text, max_chars=40)
        assert caption is None or (isinstance(caption, str) and len(caption) <= 40)


def test_deeply_nested_json_does_not_blow_up():
    assert parse_descriptions("[" * 5000 + "]" * 5000) == []


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("A zorbat with a red head standing on sand.", "A zorbat with a red head standing on sand"),
        ("Caption: a bird on a branch", "a bird on a branch"),
        ('"A cat on a mat."\nI hope this helps!', "A cat on a mat"),
        ("Sure! Here is the caption:\nA dog in the snow.", "A dog in the snow"),
        ('{"caption": "a red car"}', "a red car"),
        ("the the the the cat", "the cat"),
        ("", None),
        ("...", None),
    ],
)
def test_caption_shapes(reply, expected):
    assert parse_caption(reply) == expected
