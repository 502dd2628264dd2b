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


# ------------------------------------------------------------------------------------------------ issue 26: chatty replies

PARTS = [("beak", "a short, curved orange beak"), ("wings", "black wings with white bars"), ("legs", "thin red legs"),
         ("tail", "a long forked tail"), ("eye", "a small black eye")]
PREAMBLES = ["Sure! Here are the visual features of the bird:", "Certainly.", "Here is a list of the features:",
             "Of course! Below are the details:"]
CLOSINGS = ["Let me know if you need more detail.", "I hope this helps!", "Feel free to ask if you want more.",
            "If you have any other questions, just ask.", "Is there anything else you would like to know?"]
REFUSALS = ["I'm sorry, but I can't help with identifying people in images.",
            "I apologize, but I am unable to describe this image.", "Sorry, I cannot process this request.",
            "As an AI, I can't see this image clearly."]


STYLES = ("bold", "plain-label", "numbered", "nested", "fenced-json", "repeat")


def _styled(rng: random.Random, items: list[tuple[str, str]], style: str) -> tuple[str, list[str], str]:
    """A reply in one of the styles instruction-tuned VLMs write, and the items a careful reader keeps."""
    keep = [text for _, text in items]
    if style == "bold":
        body = [f"- **{label.title()}**: {text}" for label, text in items]
    elif style == "plain-label":
        body = [f"* {label.title()}: {text}" for label, text in items]
    elif style == "numbered":
        body = [f"{i}. {text}." for i, (_, text) in enumerate(items, 1)]
    elif style == "nested":
        body = [f"- {items[0][1]}"] + [f"  - {text}" for _, text in items[1:]]
    elif style == "fenced-json":
        import json

        body = ["```json", json.dumps({"descriptions": keep}), "```"]
    else:  # the same item twice in a row and again later: kept once
        body = [f"- {text}" for _, text in items] + [f"- {items[0][1]}"]
    lines = []
    if style != "fenced-json" or rng.random() < 0.5:
        lines.append(rng.choice(PREAMBLES))
    lines += body
    lines.append(rng.choice(CLOSINGS))
    return "\n".join(lines), keep, style


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("seed", range(3))
def test_chatty_replies_keep_exactly_the_descriptions(seed, style):
    """Generated replies with preambles, closings, bold and plain labels, numbering, nested bullets, JSON in fences
    and repetition: the parser keeps exactly the descriptions, without their labels, and reports what it dropped."""
    from grain.annotate.parse import parse_report

    rng = random.Random(seed)
    items = rng.sample(PARTS, rng.randint(2, 5))
    reply, keep, style = _styled(rng, items, style)
    got, dropped = parse_report(reply, max_items=10)
    assert got == keep, (reply, got)
    if style != "fenced-json":  # text around a fenced block is never read, so there is nothing to drop
        assert dropped.get("closing") == 1, (reply, dropped)
    assert set(dropped) <= {"closing", "preamble", "duplicate"}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_refusals_and_apologies_are_never_descriptions_or_captions(refusal):
    from grain.annotate.parse import parse_report

    got, dropped = parse_report(refusal)
    assert got == [] and dropped == {"refusal": 1}
    assert parse_caption(refusal) is None
    got, _ = parse_report(refusal + "\n- a red head\n- a blue tail")  # a refusal line before real items
    assert got == ["a red head", "a blue tail"]


@pytest.mark.parametrize("reply,caption", [
    ("Rewritten caption: A small bird perched on a branch.", "A small bird perched on a branch"),
    ("Here is the rewritten caption: A small bird on a branch.", "A small bird on a branch"),
    ("**Caption:** A red bird on a wire.", "A red bird on a wire"),
    ("New caption - a dog running on a beach", "a dog running on a beach"),
    ("A dog running on a beach.\nLet me know if you'd like another version!", "A dog running on a beach"),
])
def test_caption_labels_and_closings_are_stripped(reply, caption):
    assert parse_caption(reply) == caption


def test_the_describe_summary_counts_what_the_parser_dropped(tmp_path):
    """The describe stage's shard markers carry the parser's drops per reason, and the summary adds them up."""
    from grain.annotate.describe import _ShardState, format_counts, summarize
    from grain.config import DescribeConfig
    from grain.contracts import DESCRIPTIONS_SCHEMA
    from grain.shards import Shard, StageRun

    cfg = DescribeConfig(engine="openai")
    shard = Shard(0, ("in",))
    run = StageRun("describe", tmp_path / "out", "fp", [shard], DESCRIPTIONS_SCHEMA)
    state = _ShardState(shard, ["a", "b"], {}, ("describe", "rewrite"))
    state.add(cfg, "a", "describe", {"text": "Sure! Here you go:\n- a red head\nLet me know if you need more."})
    state.add(cfg, "a", "rewrite", {"text": "Rewritten caption: a red bird."})
    state.add(cfg, "b", "describe", {"text": "I'm sorry, but I can't describe this image."})
    state.add(cfg, "b", "rewrite", {"text": "I apologize, but I cannot rewrite this caption."})
    assert state.complete()
    assert state.rows["a"]["descriptions"] == ["a red head"] and state.rows["a"]["caption_rewrite"] == "a red bird"
    state.commit(run)
    totals = summarize(tmp_path / "out")
    assert totals["dropped"] == {"preamble": 1, "closing": 1, "refusal": 1, "caption_unusable": 1}
    assert "dropped from replies: caption_unusable 1, closing 1, preamble 1, refusal 1" in format_counts(totals)
