"""Ingest readers on fixtures the tests build: img2dataset webdataset tars (stdlib tarfile) and parquet, HF-style
parquet, CSV/TSV/JSONL + image folder. Every input row must be accounted for, with the right reason."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grain.config import IngestConfig
from grain.data.ingest import ingest
from grain.data.readers import InputError
from grain.shards import read_table
from grain.stages import INGEST
from image_corpus import build_cases

CASES = build_cases()
FAILED = [("HTTP Error 404", "failed_to_download"), ("timed out", "failed_to_download")]


def dataset_rows() -> list[dict]:
    """img2dataset-like rows: the whole image corpus, plus failed downloads, split over two shards."""
    rows = []
    for i, case in enumerate(CASES):
        rows.append({"case": case.name, "expect": case.expect, "caption": case.caption, "image": case.data, "status": "success", "error_message": None})
    for msg, status in FAILED:
        rows.append({"case": "failed", "expect": "download_failed", "caption": "lost forever", "image": None, "status": status, "error_message": msg})
    for i, row in enumerate(rows):
        shard = i % 2
        row["shard"] = shard
        row["key"] = f"{shard:05d}{i:04d}"
        row["url"] = f"http://example.invalid/{i}.jpg"
    return rows


def write_webdataset(folder: Path, rows: list[dict], *, sidecar: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for shard in sorted({r["shard"] for r in rows}):
        mine = [r for r in rows if r["shard"] == shard]
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for r in mine:
                if r["status"] != "success":
                    continue  # img2dataset writes no member for a failed download
                members = {"jpg": r["image"], "json": json.dumps({"key": r["key"], "url": r["url"], "status": "success"}).encode()}
                if r["caption"] is not None:
                    members["txt"] = r["caption"].encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{r['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        if sidecar:
            meta = [{k: r[k] for k in ("key", "caption", "url", "status", "error_message")} for r in mine]
            pq.write_table(pa.Table.from_pylist(meta), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(mine)}))


def write_img2dataset_parquet(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for shard in sorted({r["shard"] for r in rows}):
        mine = [r for r in rows if r["shard"] == shard]
        table = pa.Table.from_pylist(
            [{"key": r["key"], "caption": r["caption"], "url": r["url"], "status": r["status"], "error_message": r["error_message"], "jpg": r["image"]} for r in mine],
            schema=pa.schema([("key", pa.string()), ("caption", pa.string()), ("url", pa.string()), ("status", pa.string()), ("error_message", pa.string()), ("jpg", pa.binary())]),
        )
        pq.write_table(table, folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text("{}")


def comparable(out: Path) -> tuple[list, list]:
    kept = read_table(out).select(["uid", "caption", "image", "width", "height"]).to_pylist()
    quarantined = read_table(out, quarantine=True).select(["uid", "reason"]).to_pylist()
    return sorted(kept, key=lambda r: r["uid"]), sorted(quarantined, key=lambda r: r["uid"])


def expected_reasons(rows: list[dict]) -> dict[str, str | None]:
    return {r["key"]: r["expect"] for r in rows}


def test_webdataset_and_its_parquet_form_give_the_same_rows(tmp_path):
    rows = dataset_rows()
    write_webdataset(tmp_path / "wds", rows)
    write_img2dataset_parquet(tmp_path / "pq", rows)
    wds = ingest(IngestConfig(source="webdataset", path=str(tmp_path / "wds")), tmp_path / "out_wds")
    par = ingest(IngestConfig(source="parquet", path=str(tmp_path / "pq")), tmp_path / "out_pq")
    assert wds.complete and par.complete and wds.num_shards == par.num_shards == 2
    kept_w, quarantined_w = comparable(tmp_path / "out_wds")
    kept_p, quarantined_p = comparable(tmp_path / "out_pq")
    assert kept_w == kept_p
    assert quarantined_w == quarantined_p
    # 100 % accounted for, each with the reason the corpus expects.
    assert len(kept_w) + len(quarantined_w) == len(rows)
    expect = expected_reasons(rows)
    assert {r["uid"] for r in kept_w} == {k for k, v in expect.items() if v is None}
    assert {r["uid"]: r["reason"] for r in quarantined_w} == {k: v for k, v in expect.items() if v is not None}


def test_quarantine_keeps_the_original_bytes_and_a_reason(tmp_path):
    rows = dataset_rows()
    write_webdataset(tmp_path / "wds", rows)
    ingest(IngestConfig(source="webdataset", path=str(tmp_path / "wds")), tmp_path / "out")
    quarantine = {r["uid"]: r for r in read_table(tmp_path / "out", quarantine=True).to_pylist()}
    by_key = {r["key"]: r for r in rows}
    for uid, q in quarantine.items():
        assert q["stage"] == "ingest" and q["detail"] and q["source"].startswith("webdataset:")
        if by_key[uid]["image"] is not None:
            assert q["image"] == by_key[uid]["image"]  # nothing lost: the rejected bytes are kept
    failed = [q for q in quarantine.values() if q["reason"] == "download_failed"]
    assert {f["detail"].split("status=")[1].split(":")[0] for f in failed} == {"failed_to_download"}
    assert any("HTTP Error 404" in f["detail"] for f in failed)


def test_a_truncated_tar_is_accounted_for_through_its_sidecar(tmp_path):
    rows = dataset_rows()
    write_webdataset(tmp_path / "wds", rows)
    tar_path = tmp_path / "wds" / "00000.tar"
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: len(data) // 2])
    result = ingest(IngestConfig(source="webdataset", path=str(tmp_path / "wds")), tmp_path / "out")
    shard0 = [r for r in rows if r["shard"] == 0]
    marker = json.loads((tmp_path / "out" / "_done" / "part-00000.json").read_text())
    assert marker["rows_in"] == len(shard0) == marker["rows_out"] + sum(marker["quarantined"].values())
    assert marker["quarantined"].get("missing_image", 0) > 0
    assert result.totals["rows_in"] == len(rows)


def test_webdataset_without_sidecar(tmp_path):
    rows = [r for r in dataset_rows() if r["status"] == "success"]
    write_webdataset(tmp_path / "wds", rows, sidecar=False)
    result = ingest(IngestConfig(source="webdataset", path=str(tmp_path / "wds")), tmp_path / "out")
    assert result.totals["rows_in"] == len(rows)


def write_csv_dataset(folder: Path, fmt: str) -> tuple[Path, dict[str, str | None]]:
    """Images on disk plus a list file; returns (list file, {row uid: expected reason})."""
    images = folder / "images"
    images.mkdir(parents=True)
    records, expect = [], {}
    for i, case in enumerate(CASES):
        rel = f"sub/{case.name}.img"
        (images / "sub").mkdir(exist_ok=True)
        (images / rel).write_bytes(case.data)
        records.append({"image": rel, "caption": case.caption})
    records.append({"image": "sub/does_not_exist.jpg", "caption": "a ghost"})
    records.append({"image": "", "caption": "no path"})
    stem = "list"
    for i, case in enumerate(CASES):
        expect[f"{stem}-{i:08d}"] = case.expect
    expect[f"{stem}-{len(CASES):08d}"] = "missing_image"
    expect[f"{stem}-{len(CASES) + 1:08d}"] = "missing_image"
    path = folder / f"{stem}.{fmt}"
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in records] + ["{this is not json"]
        expect[f"{stem}-{len(CASES) + 2:08d}"] = "bad_row"
        path.write_text("\n".join(lines) + "\n")
    else:
        import csv

        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["image", "caption"], delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            for r in records:
                writer.writerow({"image": r["image"], "caption": "" if r["caption"] is None else r["caption"]})
    return path, expect


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_csv_tsv_jsonl_with_image_folder(tmp_path, fmt):
    path, expect = write_csv_dataset(tmp_path, fmt)
    cfg = IngestConfig(source="csv", path=str(path), image_root=str(tmp_path / "images"), num_shards=3)
    result = ingest(cfg, tmp_path / "out")
    assert result.complete and result.num_shards == 3
    kept, quarantined = comparable(tmp_path / "out")
    assert len(kept) + len(quarantined) == len(expect)
    assert {r["uid"] for r in kept} == {k for k, v in expect.items() if v is None}
    assert {r["uid"]: r["reason"] for r in quarantined} == {k: v for k, v in expect.items() if v is not None}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_byte_order_mark_changes_nothing(tmp_path, fmt):
    """Excel and Notepad write a UTF-8 BOM; the list must ingest to the same samples as without one (the BOM must
    not stick to the first header name, nor make the first JSON line unparsable)."""
    path, expect = write_csv_dataset(tmp_path / "plain", fmt)
    bom = tmp_path / "bom" / path.name  # same stem, so the same uids
    bom.parent.mkdir()
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    images = str(tmp_path / "plain" / "images")
    ingest(IngestConfig(source="csv", path=str(path), image_root=images, num_shards=2), tmp_path / "out_plain")
    ingest(IngestConfig(source="csv", path=str(bom), image_root=images, num_shards=2), tmp_path / "out_bom")
    kept, quarantined = comparable(tmp_path / "out_plain")
    assert kept and {r["uid"] for r in kept} == {k for k, v in expect.items() if v is None}
    assert comparable(tmp_path / "out_bom") == (kept, quarantined)  # uids, captions, image bytes, reasons


def test_duplicate_uids_are_quarantined(tmp_path):
    img = next(c for c in CASES if c.name == "good_png").data
    (tmp_path / "a.png").write_bytes(img)
    (tmp_path / "list.csv").write_text("id,path,caption\nx,a.png,first\nx,a.png,second\ny,a.png,third\n")
    cfg = IngestConfig(source="csv", path=str(tmp_path / "list.csv"), uid_column="id", num_shards=1)
    ingest(cfg, tmp_path / "out")
    kept, quarantined = comparable(tmp_path / "out")
    assert [(r["uid"], r["caption"]) for r in kept] == [("x", "first"), ("y", "third")]
    assert quarantined == [{"uid": "x", "reason": "duplicate_uid"}]


def test_hf_style_parquet_with_image_structs(tmp_path):
    good = [c for c in CASES if c.expect is None]
    table = pa.Table.from_pylist([{"image": {"bytes": c.data, "path": f"{c.name}.png"}, "text": c.name} for c in good])
    (tmp_path / "hf").mkdir()
    pq.write_table(table, tmp_path / "hf" / "train-00000-of-00001.parquet")
    result = ingest(IngestConfig(source="parquet", path=str(tmp_path / "hf")), tmp_path / "out")
    kept, quarantined = comparable(tmp_path / "out")
    assert not quarantined and sorted(r["caption"] for r in kept) == sorted(c.name for c in good)
    assert kept[0]["uid"].startswith("train-00000-of-00001-")
    assert result.totals["rows_out"] == len(good)


def test_input_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ingest(IngestConfig(source="webdataset", path=str(tmp_path / "nope")), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        ingest(IngestConfig(source="parquet", path=str(tmp_path / "empty")), tmp_path / "out")
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "empty" / "a.parquet")
    with pytest.raises(InputError, match="no image column.*ingest.image_column"):
        ingest(IngestConfig(source="parquet", path=str(tmp_path / "empty")), tmp_path / "out2")


def test_input_changes_change_the_fingerprint(tmp_path):
    rows = dataset_rows()
    write_img2dataset_parquet(tmp_path / "pq", rows)
    cfg = IngestConfig(source="parquet", path=str(tmp_path / "pq"))
    before = INGEST.fingerprint_of(cfg)
    assert INGEST.fingerprint_of(cfg) == before
    write_img2dataset_parquet(tmp_path / "pq", rows[:-1])  # the data changed under the same path
    assert INGEST.fingerprint_of(cfg) != before


def test_normalisation_is_recorded_in_meta_and_stats(tmp_path):
    rows = dataset_rows()
    write_webdataset(tmp_path / "wds", rows)
    ingest(IngestConfig(source="webdataset", path=str(tmp_path / "wds")), tmp_path / "out")
    metas = {r["uid"]: json.loads(r["meta"]) for r in read_table(tmp_path / "out").to_pylist()}
    by_case = {r["case"]: r["key"] for r in rows}
    assert "exif_orientation:6" in metas[by_case["exif_rotated"]]["grain_normalised"]
    assert "grain_normalised" not in metas[by_case["good_jpeg"]]
    assert metas[by_case["good_jpeg"]]["url"].startswith("http://example.invalid/")
    counts = Counter()
    for p in (tmp_path / "out" / "_done").glob("*.json"):
        counts.update(json.loads(p.read_text())["normalised"])
    assert counts["exif_orientation"] == 1 and counts["mode"] >= 4
