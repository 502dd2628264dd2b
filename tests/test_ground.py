"""The ground stage: reference boxes, and a tiny random OWLv2 (real classes, built locally) over Ray Data."""

from __future__ import annotations

import json

import pytest

from grain.annotate.describe import describe
from grain.annotate.ground import ground, ground_fingerprint
from grain.config import DescribeConfig, GroundConfig, IngestConfig, RayConfig, SyntheticConfig
from grain.contracts import REGIONS_SCHEMA, check_table
from grain.data.ingest import ingest
from grain.shards import read_table

RAY = RayConfig(num_cpus=2, actor_num_cpus=0.5, batch_size=4, object_store_mb=256)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ground")
    ingest(IngestConfig(num_shards=3, synthetic=SyntheticConfig(num_images=12)), root / "samples")
    describe(DescribeConfig(engine="reference"), root / "samples", root / "descriptions")
    return root / "samples", root / "descriptions"


def test_reference_copies_ground_truth_boxes(annotated, tmp_path):
    samples, descriptions = annotated
    result = ground(GroundConfig(engine="reference"), samples, descriptions, tmp_path / "r")
    assert result.complete and result.totals["rows_out"] == 12
    table = read_table(tmp_path / "r")
    check_table(table, REGIONS_SCHEMA, "regions")
    truth = {r["uid"]: r["regions"] for r in read_table(samples).to_pylist()}
    for row in table.to_pylist():
        assert [(r["text"], r["box"]) for r in row["regions"]] == [(t["text"], t["box"]) for t in truth[row["uid"]]]
        assert all(r["score"] == 1.0 for r in row["regions"])
    marker = json.loads((tmp_path / "r" / "_done" / "part-00000.json").read_text())
    assert marker["descriptions_grounded"] == marker["descriptions"] > 0
    assert sum(marker["score_histogram"].values()) == marker["boxes"]
    assert not ground(GroundConfig(engine="reference"), samples, descriptions, tmp_path / "r").did_work


def test_fingerprint_ignores_how_it_runs(annotated):
    samples, descriptions = annotated
    base = GroundConfig(engine="owlv2", model="m")
    fp = ground_fingerprint(base, samples, descriptions)
    assert ground_fingerprint(base.model_copy(update={"device": "cuda", "batch_size": 64}), samples, descriptions) == fp
    assert ground_fingerprint(base.model_copy(update={"threshold": 0.2}), samples, descriptions) != fp


def test_descriptions_must_come_from_these_samples(annotated, tmp_path):
    samples, descriptions = annotated
    ingest(IngestConfig(num_shards=2, synthetic=SyntheticConfig(num_images=8)), tmp_path / "other")
    with pytest.raises(ValueError, match="must come from these samples"):
        ground(GroundConfig(), tmp_path / "other", descriptions, tmp_path / "r")
