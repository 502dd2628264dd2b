"""Schemas round-trip through Parquet and reject rows that break them, naming the row and column."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from grain.contracts import (
    DESCRIPTIONS_SCHEMA,
    EVAL_SCHEMA,
    QUARANTINE_SCHEMA,
    REGIONS_SCHEMA,
    SAMPLES_SCHEMA,
    ContractError,
    check_table,
    rows_to_table,
)

ROWS = {
    "samples": (
        SAMPLES_SCHEMA,
        [
            {"uid": "a", "image": b"\x89PNG", "width": 4, "height": 3, "caption": "a cat", "source": "csv:x.csv",
             "meta": "{}", "label": 2, "regions": [{"text": "a red head", "box": [0.0, 0.125, 0.5, 0.75]}]},
            {"uid": "b", "image": b"\xff\xd8", "width": 5, "height": 5, "caption": "a dog", "source": "csv:x.csv",
             "meta": "{\"k\": 1}", "label": None, "regions": None},
        ],
    ),
    "descriptions": (
        DESCRIPTIONS_SCHEMA,
        [{"uid": "a", "descriptions": ["a red head", "a striped tail"], "caption_rewrite": None, "raw": "- a red head",
          "engine": "reference", "model": "ground-truth", "prompt_id": "none", "error": None}],
    ),
    "regions": (
        REGIONS_SCHEMA,
        [{"uid": "a", "regions": [{"text": "a red head", "box": [0.25, 0.0, 1.0, 0.5], "score": 0.75}], "error": None},
         {"uid": "b", "regions": [], "error": "no descriptions"}],
    ),
    "quarantine": (
        QUARANTINE_SCHEMA,
        [{"uid": "c", "stage": "ingest", "reason": "decode_error", "detail": "truncated", "source": "csv:x.csv",
          "caption": None, "image": b"\xff", "meta": None}],
    ),
    "eval": (EVAL_SCHEMA, [{"dataset": "syn", "task": "zeroshot", "mode": "names", "metric": "acc1", "value": 0.5, "n": 10}]),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_round_trip_through_parquet(tmp_path, name):
    schema, rows = ROWS[name]
    table = rows_to_table(rows, schema)
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    check_table(back, schema, "back")
    assert back.to_pylist() == rows


def test_missing_required_field_names_row_and_column():
    schema, rows = ROWS["samples"]
    bad = [rows[0], {**rows[1], "caption": None}]
    with pytest.raises(ContractError, match=r"row 1 \(uid='b'\).*'caption'"):
        rows_to_table(bad, schema)


def test_unknown_column_is_rejected():
    schema, rows = ROWS["samples"]
    with pytest.raises(ContractError, match="unknown column.*'colour'"):
        rows_to_table([{**rows[0], "colour": "red"}], schema)


def test_boxes_must_have_four_coordinates():
    schema, rows = ROWS["samples"]
    with pytest.raises(ContractError, match="regions"):
        rows_to_table([{**rows[0], "regions": [{"text": "x", "box": [0.1, 0.2, 0.3]}]}], schema)


def test_check_table_reports_schema_drift():
    schema, rows = ROWS["regions"]
    table = rows_to_table(rows, schema).drop_columns(["error"])
    with pytest.raises(ContractError, match="missing columns \\['error'\\]"):
        check_table(table, schema, "regions/part-00000.parquet")
