"""Malformed eval datasets (issue 16, item 1, evaluate): a bad-input corpus for every adapter of
grain.evaluate.datasets, generated here (nothing is downloaded).

Each case builds a small good dataset, breaks one thing, and states the outcome:

* ``Error``: evaluate.run.load_dataset raises, before any image is encoded, one single-line FileNotFoundError or
  ValueError (what ``grain evaluate`` turns into ``error: …`` and exit 2) that starts with the dataset's name and
  names the file, row, key or line at fault;
* ``Kept``: the dataset loads with exactly the samples the corpus holds (keys computed while writing it), with
  what was normalised, and with what was skipped listed in ``ignored`` (counted in the eval notes);
* ``Undecodable``: the index loads (image bytes are not read when indexing) and encoding stops with one error
  naming the dataset, the key and where it comes from.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image
from typer.testing import CliRunner

from grain.cli import USER_ERRORS, app
from grain.config import EvalDatasetConfig, SyntheticConfig
from grain.contracts import SAMPLES_SCHEMA
from grain.evaluate.run import load_dataset
from grain.shards import Shard, run_stage

COLOURS = [(230, 20, 20), (20, 200, 30), (30, 40, 220), (240, 220, 30), (200, 30, 200), (20, 210, 210)]
GARBAGE = b"\xff\xd8\xff\xe0 these bytes are no image"
from support.tars import write_tar


def png(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), COLOURS[n % len(COLOURS)]).save(buf, format="PNG")
    return buf.getvalue()


def member_end(path: Path, name: str) -> int:
    """The byte offset where member ``name``'s data (not its padding) ends in the tar."""
    with tarfile.open(path) as tf:
        info = tf.getmember(name)
        return info.offset_data + info.size


# ------------------------------------------------------------------------------------------------ good corpora
# Each builder writes one small valid dataset under tmp and returns (config, expected) with the expected keys (and
# labels / class names) computed while writing, so a "kept" case compares against the corpus, not a constant.


def image_folder(tmp: Path, **cfg: Any) -> tuple[EvalDatasetConfig, dict[str, Any]]:
    root = tmp / "folder"
    keys = []
    for label, (cls, count) in enumerate((("cat", 2), ("dog", 2))):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            (root / cls / f"{i}.png").write_bytes(png(label * 2 + i))
            keys.append(f"{cls}/{i}.png")
    return EvalDatasetConfig(name="pets", kind="image_folder", path=str(root), **cfg), {"keys": keys}


def clip_benchmark(tmp: Path) -> tuple[EvalDatasetConfig, dict[str, Any]]:
    """Two shards: 0.tar holds k0 (cat) and k1 (dog), 1.tar holds k2 (dog); every sample also has a .json member."""
    root = tmp / "wds"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    keys, labels = [], []
    for shard, chunk in (("0.tar", [("k0", 0), ("k1", 1)]), ("1.tar", [("k2", 1)])):
        members = []
        for key, label in chunk:
            members += [(f"{key}.png", png(len(keys))), (f"{key}.cls", f"{label}\n".encode()), (f"{key}.json", b"{}")]
            keys.append(key)
            labels.append(label)
        write_tar(root / "test" / shard, members)
    return EvalDatasetConfig(name="wds", kind="clip_benchmark", path=str(root)), {"keys": keys, "labels": labels}


LIST_ROWS = [("imgs/im0.png", "cat"), ("imgs/im1.png", "dog"), ("imgs/im2.png", "cat"), ("imgs/im3.png", "dog")]


def labelled_list(tmp: Path, rows: list[tuple[str, str]] | None = None, suffix: str = "csv",
                  text: bytes | None = None, **cfg: Any) -> tuple[EvalDatasetConfig, dict[str, Any]]:
    """list.<suffix> in tmp/lst (the image root) with images lst/imgs/im0..3.png; ``text`` replaces the file body."""
    root = tmp / "lst"
    (root / "imgs").mkdir(parents=True)
    for i in range(4):
        (root / "imgs" / f"im{i}.png").write_bytes(png(i))
    rows = LIST_ROWS if rows is None else rows
    path = root / f"list.{suffix}"
    if text is None:
        if suffix == "jsonl":
            text = "".join(json.dumps({"image": p, "label": lab}) + "\n" for p, lab in rows).encode()
        else:
            text = ("image,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows)).encode()
    path.write_bytes(text)
    return EvalDatasetConfig(name="lst", kind="list", path=str(path), **cfg), {"keys": [p for p, _ in rows]}


def karpathy(tmp: Path, edit: Callable[[list[dict[str, Any]]], None] | None = None,
             text: bytes | None = None) -> tuple[EvalDatasetConfig, dict[str, Any]]:
    """coco/val2014/img0..3.jpg (PNG bytes: the suffix does not matter to the decoder); img0..2 in split test."""
    root = tmp / "coco"
    (root / "val2014").mkdir(parents=True)
    images = []
    for i, split in enumerate(["test", "test", "test", "train"]):
        (root / "val2014" / f"img{i}.jpg").write_bytes(png(i))
        images.append({"filepath": "val2014", "filename": f"img{i}.jpg", "split": split,
                       "sentences": [{"raw": f"image {i} caption {k}"} for k in range(2)]})
    if edit is not None:
        edit(images)
    path = tmp / "k.json"
    path.write_bytes(json.dumps({"images": images}).encode() if text is None else text)
    keys = [f"{e['filepath']}/{e['filename']}" for e in images if e.get("split") == "test"]
    return EvalDatasetConfig(name="coco", kind="karpathy", path=str(path), image_root=str(root)), {"keys": keys}


def samples(tmp: Path, bad: tuple[int, int] | None = None) -> tuple[EvalDatasetConfig, dict[str, Any]]:
    """A samples/ stage folder of two parts × two rows (labels 0, 1); ``bad`` = (part, row) gets GARBAGE bytes."""
    def process(shard, sink):
        for j in range(2):
            image = GARBAGE if (shard.index, j) == bad else png(j)
            sink.write({"uid": f"u{shard.index}-{j}", "image": image, "width": 8, "height": 8, "caption": "c",
                        "source": "test", "meta": "{}", "label": j})
        return {"rows_in": 2}

    out = tmp / "samples"
    run_stage("ingest", out, "fp", [Shard(0), Shard(1)], process, SAMPLES_SCHEMA)
    (tmp / "names.txt").write_text("cat\ndog\n")
    return (EvalDatasetConfig(name="samp", kind="samples", path=str(out), classnames=str(tmp / "names.txt")),
            {"keys": ["u0-0", "u0-1", "u1-0", "u1-1"]})


# ------------------------------------------------------------------------------------------------ outcomes


@dataclass
class Error:
    """load_dataset raises ``kind`` with one line matching ``pattern`` (after the dataset's name)."""

    kind: type[Exception]
    pattern: str


@dataclass
class Kept:
    """Loads with the corpus's samples; ``check`` asserts what was normalised, ``ignored`` what was skipped."""

    check: Callable[[Any, dict[str, Any]], bool] | None = None
    ignored: list[str] | None = None


@dataclass
class Undecodable:
    """Loads with the corpus's samples; encoding stops with one error matching ``pattern`` (after the name)."""

    pattern: str


CASES: list[Any] = []


def case(outcome: Error | Kept | Undecodable):
    def register(build: Callable[[Path], tuple[EvalDatasetConfig, dict[str, Any]]]):
        CASES.append(pytest.param(build, outcome, id=build.__name__))
        return build

    return register


def cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


# ----------------------------------------------------------------------------------- ImageFolder


@case(Error(FileNotFoundError, r".*names\.txt does not exist"))
def folder_classnames_file_missing(tmp):
    return image_folder(tmp, classnames=str(tmp / "names.txt"))


@case(Error(ValueError, r".*names\.txt:2: not UTF-8 text \(byte e9 at byte 4 of the line\)"))
def folder_classnames_not_utf8(tmp):
    (tmp / "names.txt").write_bytes(b"a cat\ncaf\xe9 dog\n")
    return image_folder(tmp, classnames=str(tmp / "names.txt"))


@case(Error(ValueError, r"3 classnames given but .*folder has 2 class folders"))
def folder_classnames_count_differs(tmp):
    (tmp / "names.txt").write_text("a\nb\nc\n")
    return image_folder(tmp, classnames=str(tmp / "names.txt"))


@case(Kept(check=lambda data, exp: data.classnames == ["a cat", "a dog"]))
def folder_classnames_bom_crlf_trailing_blank_normalised(tmp):
    (tmp / "names.txt").write_bytes(b"\xef\xbb\xbfa cat\r\na dog\r\n\r\n")
    return image_folder(tmp, classnames=str(tmp / "names.txt"))


@case(Kept(ignored=[".git/", "README.txt", "cat/.ipynb_checkpoints/", "dog/._1.png", "dog/notes.txt"]))
def folder_non_images_and_hidden_folders_counted(tmp):
    ds, exp = image_folder(tmp)
    root = Path(ds.path)
    (root / "README.txt").write_text("how it was made")
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes(png(0))
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    (root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(png(0))  # not a sample: counted
    (root / "dog" / "notes.txt").write_text("x")
    (root / "dog" / "._1.png").write_bytes(b"macOS resource fork")
    return ds, exp


@case(Undecodable(r"dog/2\.jpg: cannot decode image"))
def folder_undecodable_image(tmp):
    ds, exp = image_folder(tmp)
    (Path(ds.path) / "dog" / "2.jpg").write_bytes(GARBAGE)
    return ds, {"keys": exp["keys"] + ["dog/2.jpg"]}


# ----------------------------------------------------------------------------------- CLIP_benchmark webdataset


@case(Error(FileNotFoundError, r".*wds/classnames\.txt does not exist"))
def wds_classnames_missing(tmp):
    ds, exp = clip_benchmark(tmp)
    (Path(ds.path) / "classnames.txt").unlink()
    return ds, exp


@case(Error(ValueError, r".*wds/classnames\.txt:2: not UTF-8 text \(byte ff at byte 1 of the line\)"))
def wds_classnames_not_utf8(tmp):
    ds, exp = clip_benchmark(tmp)
    (Path(ds.path) / "classnames.txt").write_bytes(b"cat\n\xffdog\n")
    return ds, exp


@case(Error(ValueError, r".*zeroshot_classification_templates\.txt:1: not UTF-8 text \(byte 96"))
def wds_templates_not_utf8(tmp):
    ds, exp = clip_benchmark(tmp)
    (Path(ds.path) / "zeroshot_classification_templates.txt").write_bytes(b"a \x96photo\x96 of a {c}.\n")
    return ds, exp


@case(Error(ValueError, r".*test/1\.tar key 'k2': class index 2 outside \[0, 2\) of .*classnames\.txt"))
def wds_class_index_out_of_range(tmp):
    ds, exp = clip_benchmark(tmp)
    write_tar(Path(ds.path) / "test" / "1.tar", [("k2.png", png(2)), ("k2.cls", b"2")])
    return ds, exp


@case(Error(ValueError, r".*test/1\.tar key 'k2': \.cls holds '1\.0', not an integer class index"))
def wds_label_not_an_int(tmp):
    ds, exp = clip_benchmark(tmp)
    write_tar(Path(ds.path) / "test" / "1.tar", [("k2.png", png(2)), ("k2.cls", b"1.0")])
    return ds, exp


@case(Error(ValueError, r".*test/1\.tar key 'k2': \.cls is not UTF-8 text"))
def wds_cls_not_utf8(tmp):
    ds, exp = clip_benchmark(tmp)
    write_tar(Path(ds.path) / "test" / "1.tar", [("k2.png", png(2)), ("k2.cls", b"\xff")])
    return ds, exp


@case(Error(ValueError, r".*test/0\.tar: cannot read the tar \(cut short inside a member; ReadError"))
def wds_truncated_mid_member(tmp):
    ds, exp = clip_benchmark(tmp)
    shard = Path(ds.path) / "test" / "0.tar"
    cut(shard, member_end(shard, "k1.png") - 10)  # inside k1's image data
    return ds, exp


@case(Error(ValueError, r".*test/0\.tar: cannot read the tar \(ReadError: cut short: \d+ bytes and no end-of-archive block"))
def wds_truncated_at_a_member_boundary(tmp):
    # tarfile reads this as a complete tar holding k0 alone: k1 would vanish without the end-of-archive check
    ds, exp = clip_benchmark(tmp)
    shard = Path(ds.path) / "test" / "0.tar"
    end = member_end(shard, "k0.json")
    cut(shard, end + (-end) % 512)
    return ds, exp


@case(Error(ValueError, r".*test/0\.tar: cannot read the tar \(ReadError: cut short"))
def wds_truncated_inside_a_header(tmp):
    ds, exp = clip_benchmark(tmp)
    shard = Path(ds.path) / "test" / "0.tar"
    end = member_end(shard, "k0.json")
    cut(shard, end + (-end) % 512 + 100)  # 100 bytes into k1.png's header
    return ds, exp


@case(Error(ValueError, r".*test/1\.tar key 'k2': no image member"))
def wds_sample_without_image(tmp):
    ds, exp = clip_benchmark(tmp)
    write_tar(Path(ds.path) / "test" / "1.tar", [("k2.cls", b"1"), ("k2.json", b"{}")])
    return ds, exp


@case(Error(ValueError, r".*test/1\.tar key 'k2': no \.cls member"))
def wds_sample_without_cls(tmp):
    ds, exp = clip_benchmark(tmp)
    write_tar(Path(ds.path) / "test" / "1.tar", [("k2.png", png(2)), ("k2.json", b"{}")])
    return ds, exp


@case(Error(ValueError, r".*test/1\.tar: an empty file \(0 bytes\), not a tar$"))
def wds_empty_file(tmp):
    ds, exp = clip_benchmark(tmp)
    (Path(ds.path) / "test" / "1.tar").write_bytes(b"")
    return ds, exp


@case(Error(ValueError, r".*test/1\.tar: the tar holds no samples"))
def wds_tar_without_members(tmp):
    ds, exp = clip_benchmark(tmp)
    write_tar(Path(ds.path) / "test" / "1.tar", [])
    return ds, exp


@case(Error(ValueError, r".*test/1\.tar: a compressed tar"))
def wds_compressed_tar(tmp):
    ds, exp = clip_benchmark(tmp)
    shard = Path(ds.path) / "test" / "1.tar"
    shard.write_bytes(gzip.compress(shard.read_bytes()))
    return ds, exp


@case(Kept(check=lambda data, exp: data.labels.tolist() == exp["labels"]))
def wds_extra_members_and_hidden_files_are_not_samples(tmp):
    ds, exp = clip_benchmark(tmp)
    shard = Path(ds.path) / "test" / "1.tar"
    write_tar(shard, [("k2.png", png(2)), ("k2.cls", b" 1\n"), ("k2.txt", b"a caption"), ("._k2.png", b"fork"),
                      ("README", b"no extension")])
    return ds, exp


@case(Undecodable(r"k1 \(0\.tar member k1\.png\): cannot decode image"))
def wds_undecodable_image(tmp):
    ds, exp = clip_benchmark(tmp)
    write_tar(Path(ds.path) / "test" / "0.tar", [("k0.png", png(0)), ("k0.cls", b"0"), ("k1.png", GARBAGE), ("k1.cls", b"1")])
    return ds, exp


# ----------------------------------------------------------------------------------- labelled lists


@case(Error(FileNotFoundError, r".*list\.csv:3: image .*lst/imgs/missing\.png does not exist"))
def list_missing_image(tmp):
    return labelled_list(tmp, [LIST_ROWS[0], ("imgs/missing.png", "dog")])


@case(Error(ValueError, r".*list\.csv:3: image path '/.*/secret\.png' leaves the image root .*; not read"))
def list_absolute_path_outside_root(tmp):
    (tmp / "secret.png").write_bytes(png(5))
    return labelled_list(tmp, [LIST_ROWS[0], (str(tmp / "secret.png"), "dog")])


@case(Error(ValueError, r".*list\.csv:3: image path 'imgs/\.\./\.\./secret\.png' leaves the image root"))
def list_dotdot_path_outside_root(tmp):
    (tmp / "secret.png").write_bytes(png(5))
    return labelled_list(tmp, [LIST_ROWS[0], ("imgs/../../secret.png", "dog")])


@case(Error(ValueError, r".*list\.csv:3: image path 'imgs/link\.png' leaves the image root"))
def list_symlink_out_of_root(tmp):
    (tmp / "secret.png").write_bytes(png(5))
    out = labelled_list(tmp, [LIST_ROWS[0], ("imgs/link.png", "dog")])
    os.symlink(tmp / "secret.png", tmp / "lst" / "imgs" / "link.png")
    return out


@case(Error(ValueError, r".*list\.csv:4: no value in column 'label' \(the row has fewer fields than the header\)"))
def list_csv_row_missing_a_column(tmp):
    return labelled_list(tmp, text=b"image,label\nimgs/im0.png,cat\nimgs/im1.png,dog\nimgs/im2.png\n")


@case(Error(ValueError, r".*list\.jsonl:2: no label column \(label/class\); the row has \['image'\]"))
def list_jsonl_row_missing_a_key(tmp):
    return labelled_list(tmp, suffix="jsonl", text=b'{"image": "imgs/im0.png", "label": "cat"}\n{"image": "imgs/im1.png"}\n')


@case(Error(ValueError, r".*list\.csv:3: label '1\.5' is a number but not an integer class index"))
def list_label_not_an_int(tmp):
    (tmp / "names.txt").write_text("cat\ndog\n")
    return labelled_list(tmp, [("imgs/im0.png", "0"), ("imgs/im1.png", "1.5")], classnames=str(tmp / "names.txt"))


@case(Error(ValueError, r".*list\.csv:2: label '2\.0' is a number but not an integer class index"))
def list_float_label_without_classnames(tmp):
    # without this check "2.0" and "1.0" would silently become two class names
    return labelled_list(tmp, [("imgs/im0.png", "2.0"), ("imgs/im1.png", "1.0")])


@case(Error(ValueError, r".*list\.jsonl:1: label 1\.0 is a number but not an integer class index"))
def list_json_float_label(tmp):
    (tmp / "names.txt").write_text("cat\ndog\n")
    return labelled_list(tmp, suffix="jsonl", text=b'{"image": "imgs/im0.png", "label": 1.0}\n',
                         classnames=str(tmp / "names.txt"))


@case(Error(ValueError, r".*list\.csv:3: label index 5 outside \[0, 2\) of the 2 classnames"))
def list_class_index_out_of_range(tmp):
    (tmp / "names.txt").write_text("cat\ndog\n")
    return labelled_list(tmp, [("imgs/im0.png", "0"), ("imgs/im1.png", "5")], classnames=str(tmp / "names.txt"))


@case(Error(FileNotFoundError, r".*names\.txt does not exist"))
def list_classnames_file_missing(tmp):
    return labelled_list(tmp, classnames=str(tmp / "names.txt"))


@case(Error(ValueError, r".*list\.csv:3: not UTF-8 text \(byte ff at byte 15 of the line\)"))
def list_not_utf8(tmp):
    return labelled_list(tmp, text=b"image,label\nimgs/im0.png,cat\nimgs/im1.png,d\xffg\n")


# the row and column are named; the wording depends on whether grain.data.files' text rule (which reads such an
# escape as an undecodable byte) or the adapter's own check sees it first
@case(Error(ValueError, r".*list\.jsonl:2: .*label.*(unpaired surrogate|not valid utf-8)"))
def list_json_unpaired_surrogate_escape(tmp):
    return labelled_list(tmp, suffix="jsonl", text=b'{"image": "imgs/im0.png", "label": "cat"}\n'
                                                 b'{"image": "imgs/im1.png", "label": "d\\udcffg"}\n')


@case(Error(ValueError, r"duplicate key 'imgs/im0\.png': .*list\.csv:2 and .*list\.csv:3"))
def list_one_image_under_two_spellings(tmp):
    return labelled_list(tmp, [("imgs/im0.png", "cat"), ("./imgs/x/../im0.png", "dog")])


def _normalised_list(data: Any, exp: dict[str, Any]) -> bool:
    return data.classnames == ["cat", "dog"] and data.labels.tolist() == [0, 1, 0, 1]


@case(Kept(check=_normalised_list))
def list_bom_dot_paths_and_spaces_normalised(tmp):
    text = "\ufeffimage,label\n./imgs/im0.png, cat\nimgs/sub/../im1.png,dog \n imgs/im2.png ,cat\nimgs//im3.png,dog\n"
    ds, exp = labelled_list(tmp, text=text.encode())
    return ds, {"keys": [p for p, _ in LIST_ROWS]}


@case(Undecodable(r"imgs/im3\.png \(row .*list\.csv:5\): cannot decode image"))
def list_undecodable_image(tmp):
    out = labelled_list(tmp)
    (tmp / "lst" / "imgs" / "im3.png").write_bytes(GARBAGE)
    return out


# ----------------------------------------------------------------------------------- Karpathy retrieval JSON


@case(Error(ValueError, r".*k\.json: not valid JSON \(Unterminated string"))
def karpathy_malformed_json(tmp):
    return karpathy(tmp, text=b'{"images": [{"filename": "img0.jpg", "split": "test", "sentences": [{"raw": "a')


@case(Error(ValueError, r".*k\.json: no 'images' key \(Karpathy split format\); the object has keys \['annotations'\]"))
def karpathy_no_images_key(tmp):
    return karpathy(tmp, text=b'{"annotations": []}')


@case(Error(ValueError, r".*k\.json images\[1\] \(val2014/img1\.jpg\): no 'sentences'"))
def karpathy_image_without_sentences(tmp):
    return karpathy(tmp, lambda images: images[1].update(sentences=[]))


@case(Error(ValueError, r".*k\.json images\[2\]: no 'split'"))
def karpathy_image_without_split(tmp):
    return karpathy(tmp, lambda images: images[2].pop("split"))


@case(Error(FileNotFoundError, r".*k\.json images\[1\] \(val2014/img1\.jpg\): image .*img1\.jpg does not exist"))
def karpathy_missing_image(tmp):
    out = karpathy(tmp)
    (tmp / "coco" / "val2014" / "img1.jpg").unlink()
    return out


@case(Error(ValueError, r".*k\.json images\[1\] \(val2014/\.\./\.\./secret\.jpg\): image path .* leaves the image root"))
def karpathy_dotdot_filename(tmp):
    (tmp / "secret.jpg").write_bytes(png(5))
    return karpathy(tmp, lambda images: images[1].update(filename="../../secret.jpg"))


@case(Error(ValueError, r".*k\.json images\[0\] \(/.*secret\.jpg\): image path .* leaves the image root"))
def karpathy_absolute_filename(tmp):
    (tmp / "secret.jpg").write_bytes(png(5))
    return karpathy(tmp, lambda images: images[0].update(filepath="", filename=str(tmp / "secret.jpg")))


@case(Error(ValueError, r".*k\.json:1: not UTF-8 text \(byte e9 at byte \d+ of the line\)"))
def karpathy_not_utf8(tmp):
    body = json.dumps({"images": [{"filename": "img0.jpg", "filepath": "val2014", "split": "test",
                                   "sentences": [{"raw": "a cafe"}]}]}).encode()
    return karpathy(tmp, text=body.replace(b"a cafe", b"a caf\xe9"))


@case(Error(ValueError, r".*k\.json images\[0\] \(val2014/img0\.jpg\) sentence 1: the caption .* unpaired surrogate"))
def karpathy_caption_unpaired_surrogate_escape(tmp):
    return karpathy(tmp, lambda images: images[0]["sentences"][1].update(raw="caf\udce9"))


@case(Error(ValueError, r"image_root .* is required for kind karpathy"))
def karpathy_without_image_root(tmp):
    ds, exp = karpathy(tmp)
    return ds.model_copy(update={"image_root": None}), exp


@case(Kept(check=lambda data, exp: data.captions[0] == ["image 0 caption 0", "image 0 caption 1"]))
def karpathy_dot_filepath_normalised_other_splits_not_selected(tmp):
    ds, _ = karpathy(tmp, lambda images: images[0].update(filepath="./val2014"))
    return ds, {"keys": ["val2014/img0.jpg", "val2014/img1.jpg", "val2014/img2.jpg"]}  # img3 is in split train


@case(Undecodable(r"val2014/img1\.jpg \(k\.json images\[1\]\): cannot decode image"))
def karpathy_undecodable_image(tmp):
    out = karpathy(tmp)
    (tmp / "coco" / "val2014" / "img1.jpg").write_bytes(GARBAGE)
    return out


# ----------------------------------------------------------------------------------- samples/ folders


@case(Undecodable(r"u1-0 \(part-00001\.parquet\): cannot decode image"))
def samples_undecodable_image(tmp):
    return samples(tmp, bad=(1, 0))


@case(Undecodable(r"u1-0 \(part-00001\.parquet\): cannot read it: .*part-00001\.parquet row group 0 row 0: the "
                  r"image cell is null"))
def samples_null_image_cell(tmp):
    # ingest never writes one (the contract's image is not null); a hand-made samples/ folder can
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = samples(tmp)
    part = Path(out[0].path) / "part-00001.parquet"
    table = pq.read_table(part)
    images = pa.array([None] + table.column("image").to_pylist()[1:], pa.binary())
    i = table.schema.get_field_index("image")
    pq.write_table(table.set_column(i, pa.field("image", pa.binary(), nullable=True), images), part)
    return out


@case(Error(ValueError, r".*names\.txt:1: not UTF-8 text"))
def samples_classnames_not_utf8(tmp):
    out = samples(tmp)
    (tmp / "names.txt").write_bytes(b"\xe9t\xe9\nhiver\n")
    return out


# ------------------------------------------------------------------------------------------------ the table


@pytest.fixture(scope="module")
def model():
    from grain.train.model import build_model

    return build_model("grain-tiny", "clip").eval()


@pytest.mark.parametrize("build, outcome", CASES)
def test_bad_eval_input(tmp_path, build, outcome, request):
    ds, expected = build(tmp_path)
    if isinstance(outcome, Error):
        with pytest.raises(outcome.kind) as err:
            load_dataset(ds, SyntheticConfig(), tmp_path)
        message = str(err.value)
        assert isinstance(err.value, USER_ERRORS) and not isinstance(err.value, UnicodeError)  # the CLI's exit 2
        assert "\n" not in message, message  # one line
        prefix = rf"evaluate\.datasets\[{ds.name}\]( \({ds.kind}\))?: "  # the dataset, then the file/row/key/line
        assert re.match(prefix + outcome.pattern, message), message
        return
    (data,), _ = load_dataset(ds, SyntheticConfig(), tmp_path)
    assert data.keys == expected["keys"]  # exactly the corpus's samples, in order: none dropped, none invented
    if isinstance(outcome, Kept):
        assert outcome.check is None or outcome.check(data, expected)
        assert (getattr(data, "ignored", None) or []) == (outcome.ignored or [])  # what the eval notes count
        return
    from grain.evaluate.zeroshot import encode_images

    model = request.getfixturevalue("model")
    # the call evaluate() makes (evaluate/run.py): the dataset's name and each key with where it comes from
    with pytest.raises(ValueError) as err:
        encode_images(model, len(data.keys), data.load, batch_size=2, desc=ds.name, keys=data.locations())
    message = str(err.value)
    assert "\n" not in message and re.match(rf"{ds.name}: image {outcome.pattern}", message), message


# ------------------------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    from grain.train.model import save_model

    return save_model(model, tmp_path_factory.mktemp("model") / "model")


def _cli(model_dir: Path, tmp: Path, datasets: list[EvalDatasetConfig]):
    spec = "[" + ", ".join(json.dumps(d.model_dump(exclude_none=True)) for d in datasets) + "]"
    return CliRunner().invoke(app, ["evaluate", "--model", str(model_dir), "--out", str(tmp / "out"), "--no-progress",
                                    "--set", f"workdir={tmp / 'work'}", "--set", "evaluate.modes=[names]",
                                    "--set", f"evaluate.datasets={spec}"])


def test_cli_reports_a_bad_file_in_one_line_before_any_encoding(model_dir, tmp_path):
    good, _ = image_folder(tmp_path)
    bad, _ = labelled_list(tmp_path, text=b"image,label\nimgs/im0.png,caf\xe9\n")
    res = _cli(model_dir, tmp_path, [good, bad])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    (line,) = [l for l in res.output.splitlines() if l.strip()]
    assert line.startswith("error: evaluate.datasets[lst] (list): ") and "list.csv:2: not UTF-8 text" in line, line
    assert "Traceback" not in res.output
    # the good dataset before it was not encoded either: every dataset loads before any image is encoded
    assert not list((tmp_path / "work").rglob("*.safetensors")) and not (tmp_path / "out").exists()


def test_cli_reports_an_undecodable_image_and_counts_ignored_files(model_dir, tmp_path):
    ds, exp = clip_benchmark(tmp_path)
    write_tar(Path(ds.path) / "test" / "1.tar", [("k2.png", GARBAGE), ("k2.cls", b"1")])
    res = _cli(model_dir, tmp_path, [ds])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert "error: wds: image k2 (1.tar member k2.png): cannot decode image" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()

    folder, exp = image_folder(tmp_path / "f")
    (Path(folder.path) / "README.txt").write_text("x")
    (Path(folder.path) / "cat" / ".cache").mkdir()
    res = _cli(model_dir, tmp_path, [folder])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["datasets"]["pets"]["images"] == len(exp["keys"])
    assert summary["skipped"] == ["pets: 2 file(s) or hidden folder(s) that are not samples ignored (README.txt, cat/.cache/)"]
    assert "- pets: 2 file(s) or hidden folder(s)" in (tmp_path / "out" / "results.md").read_text()
