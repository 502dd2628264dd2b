"""The Parquet contracts between stages: one ``pyarrow.schema`` per arrow of the pipeline.

Every stage reads and writes folders of shards ``part-00000.parquet …``; shard *i* of a stage is derived from
shard *i* of its input, so any shard can be joined across stages by index and ``uid``.

Box convention (everywhere, on disk and between stages): ``[x0, y0, x1, y1]`` as float32, normalised to [0, 1]
of the **original** image (the stored ``width``/``height``), x to the right, y downwards. Models that use other
frames (cx/cy/w/h, a padded square, pixels) convert at their own edges.

See docs/data-format.md for the human-readable version of this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

#: One grounded phrase: the description text and its box (xyxy, normalised to the original image).
REGION_TYPE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
    ]
)

#: A detector's region: like ``REGION_TYPE`` plus the detector score.
SCORED_REGION_TYPE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ]
)

#: samples/ — one row per image (written by ingest).
SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes (JPEG/PNG/WebP), EXIF already applied
        pa.field("width", pa.int32(), nullable=False),  # of the stored image, after orientation
        pa.field("height", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # reader + input file, e.g. "webdataset:00003.tar"
        pa.field("meta", pa.string(), nullable=False),  # JSON object: reader-specific fields, normalisation log
        pa.field("label", pa.int32(), nullable=True),  # class index (eval sets, synthetic world); null if none
        pa.field("regions", pa.list_(REGION_TYPE), nullable=True),  # ground truth where the dataset carries it
    ],
    metadata={"grain.contract": "samples/1"},
)

#: descriptions/ — one row per image (written by describe).
DESCRIPTIONS_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("descriptions", pa.list_(pa.string()), nullable=False),  # <= K parsed, deduplicated
        pa.field("caption_rewrite", pa.string(), nullable=True),
        pa.field("raw", pa.string(), nullable=True),  # the engine's unparsed reply
        pa.field("engine", pa.string(), nullable=False),  # vllm | openai | transformers | reference
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=True),  # set when the request failed; the row is kept
    ],
    metadata={"grain.contract": "descriptions/1"},
)

#: regions/ — one row per image (written by ground).
REGIONS_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("regions", pa.list_(SCORED_REGION_TYPE), nullable=False),
        pa.field("error", pa.string(), nullable=True),
    ],
    metadata={"grain.contract": "regions/1"},
)

#: quarantine/ — one row per rejected input row, in any stage. Original fields are kept where readable, so
#: nothing is lost: ``image`` holds the raw input bytes, ``meta`` the reader's other fields as JSON.
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # a short machine-readable code, see QUARANTINE_REASONS
        pa.field("detail", pa.string(), nullable=False),  # a sentence for people
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=True),
        pa.field("image", pa.binary(), nullable=True),
        pa.field("meta", pa.string(), nullable=True),
    ],
    metadata={"grain.contract": "quarantine/1"},
)

#: eval/ — one row per (dataset, task, mode, metric).
EVAL_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("n", pa.int64(), nullable=False),
    ],
    metadata={"grain.contract": "eval/1"},
)

#: Reasons a row can be quarantined, with what each means. Stages may only use these codes.
QUARANTINE_REASONS: dict[str, str] = {
    "empty_file": "the image file or field has zero bytes",
    "missing_image": "the row names an image that is not there (file, tar member or column missing)",
    "download_failed": "the source recorded a failed download for this row (img2dataset status != success)",
    "not_an_image": "the bytes are not in any image format Pillow can identify",
    "decode_error": "the image header was read but decoding failed (truncated or corrupt data)",
    "too_large": "width x height exceeds ingest.max_pixels (decompression-bomb guard); not decoded",
    "too_small": "the shorter side is below ingest.min_side",
    "missing_caption": "no caption text (null or empty after stripping)",
    "caption_too_long": "the caption is longer than ingest.max_caption_chars (quarantined with its first that many characters)",
    "duplicate_uid": "a row with the same uid was already accepted",
    "bad_row": "the input row could not be parsed (malformed JSON/CSV line, wrong types)",
    "bad_regions": "the row's ground-truth regions (webdataset KEY.json 'regions') are malformed",
    "bad_text": "the caption's bytes are not valid ingest.text_encoding and no ingest.fallback_encoding is set",
    "outside_root": "the row's image path resolves outside ingest.image_root (absolute, '..' or a link); not read",
}

SCHEMAS: dict[str, pa.Schema] = {
    "samples": SAMPLES_SCHEMA,
    "descriptions": DESCRIPTIONS_SCHEMA,
    "regions": REGIONS_SCHEMA,
    "quarantine": QUARANTINE_SCHEMA,
    "eval": EVAL_SCHEMA,
}


class ContractError(ValueError):
    """A table or row does not satisfy its stage's schema."""


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts, checking every field against ``schema``.

    Raises ContractError naming the first offending row and column (unknown keys, nulls in non-nullable
    fields, wrong types, boxes that are not 4 floats).
    """
    rows = list(rows)
    names = set(schema.names)
    for i, row in enumerate(rows):
        extra = set(row) - names
        if extra:
            raise ContractError(f"row {i}: unknown column(s) {sorted(extra)}; schema has {schema.names}")
        for field in schema:
            if row.get(field.name) is None and not field.nullable:
                uid = row.get("uid", "?")
                raise ContractError(f"row {i} (uid={uid!r}): column {field.name!r} is required but missing/null")
    columns = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        try:
            columns[field.name] = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            bad = _first_bad_value(values, field.type)
            raise ContractError(f"column {field.name!r}: {exc} (first bad row: {bad})") from exc
    return pa.Table.from_pydict(columns, schema=schema)


def _first_bad_value(values: list[Any], type_: pa.DataType) -> str:
    for i, value in enumerate(values):
        try:
            pa.array([value], type=type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
            return f"row {i}: {value!r:.80}"
    return "unknown"


def check_table(table: pa.Table, schema: pa.Schema, where: str = "table") -> None:
    """Raise ContractError if ``table`` does not have exactly ``schema``'s columns and types (order-insensitive)."""
    have = {f.name: f.type for f in table.schema}
    want = {f.name: f.type for f in schema}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(n for n in set(want) & set(have) if not have[n].equals(want[n]))
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"unexpected columns {extra}")
        for n in wrong:
            parts.append(f"column {n!r} is {have[n]}, expected {want[n]}")
        raise ContractError(f"{where}: " + "; ".join(parts))
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise ContractError(f"{where}: column {field.name!r} has {table.column(field.name).null_count} nulls")
