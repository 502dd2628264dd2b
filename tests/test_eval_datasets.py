"""grain.evaluate.datasets and grain.evaluate.descriptors on tiny fixtures built in tmp_path.

Every image is a solid colour unique to it, so ``load(i)`` can be checked to return exactly item *i*.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grain.config import IngestConfig, SyntheticConfig
from grain.contracts import SAMPLES_SCHEMA
from grain.data.ingest import ingest
from grain.data.synthetic import build_world
from grain.evaluate.datasets import (
    ClassificationSet,
    RetrievalSet,
    load_clip_benchmark,
    load_image_folder,
    load_karpathy,
    load_labelled_list,
    load_samples,
    load_samples_retrieval,
    swap_pairs,
    synthetic_classification,
)
from grain.evaluate.descriptors import (
    align_descriptors,
    descriptor_prompts,
    descriptor_sentence,
    normalise_name,
    read_descriptor_json,
)
from grain.shards import Shard, output_parts, run_stage

COLOURS = [(230, 20, 20), (20, 200, 30), (30, 40, 220), (240, 220, 30), (200, 30, 200), (20, 210, 210), (250, 250, 250), (10, 10, 10)]
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF"}


def solid(colour: tuple[int, int, int], ext: str = "png", size: int = 16) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (size, size), colour)
    kwargs = {"quality": 95} if ext in ("jpg", "jpeg", "webp") else {}
    img.save(buf, format=FORMATS[ext.lower()], **kwargs)
    return buf.getvalue()


def colour_of(data: bytes) -> tuple[int, ...]:
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    return tuple(int(round(v)) for v in arr.reshape(-1, 3).mean(0))


def assert_colour(data: bytes, colour: tuple[int, int, int], tol: int = 10) -> None:
    got = colour_of(data)
    assert max(abs(a - b) for a, b in zip(got, colour)) <= tol, (got, colour)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------------------------- CLIP_benchmark


def make_clip_benchmark(root: Path, templates: bool = True) -> list[tuple[str, int, tuple[int, int, int]]]:
    """Two shards named so that natural order (2 < 10) differs from string order; returns (key, label, colour)."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\ndog\ngolden retriever\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na blurry photo of a {c}.\n")
    items = [("s0000000", "webp", 2), ("s0000001", "png", 0), ("s0000002", "jpg", 1), ("s0000003", "webp", 0)]
    expected = []
    for shard, chunk in (("2.tar", items[:2]), ("10.tar", items[2:])):
        members = []
        for key, ext, label in chunk:
            colour = COLOURS[len(expected)]
            members += [(f"{key}.{ext}", solid(colour, ext)), (f"{key}.cls", f"{label}\n".encode()), (f"{key}.json", b"{}")]
            expected.append((key, label, colour))
        write_tar(root / "test" / shard, members)
    return expected


def test_clip_benchmark_index_labels_templates_and_lazy_load(tmp_path):
    expected = make_clip_benchmark(tmp_path / "wds_x")
    ds = load_clip_benchmark(tmp_path / "wds_x")
    assert isinstance(ds, ClassificationSet) and ds.name == "wds_x/test" and len(ds) == 4
    assert ds.classnames == ["cat", "dog", "golden retriever"]
    assert ds.templates == ["a photo of a {c}.", "a blurry photo of a {c}."]
    assert ds.prompts("dog") == ["a photo of a dog.", "a blurry photo of a dog."]
    assert ds.keys == [k for k, _, _ in expected]  # 2.tar before 10.tar
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [lab for _, lab, _ in expected]
    for i, (_, _, colour) in enumerate(expected):
        assert_colour(ds.load(i), colour)
    assert ds.image(0).mode == "RGB"
    # the loader is picklable (worker processes) and reads the same member
    assert pickle.loads(pickle.dumps(ds.load))(3) == ds.load(3)
    # same data → same fingerprint; edited class names → a new one
    assert load_clip_benchmark(tmp_path / "wds_x").fingerprint == ds.fingerprint
    (tmp_path / "wds_x" / "classnames.txt").write_text("cat\ndog\nretriever\n")
    changed = load_clip_benchmark(tmp_path / "wds_x")
    assert changed.classnames[2] == "retriever" and changed.fingerprint != ds.fingerprint


def test_clip_benchmark_default_templates_and_changed_tar(tmp_path):
    make_clip_benchmark(tmp_path / "d", templates=False)
    ds = load_clip_benchmark(tmp_path / "d")
    assert ds.templates == ["a photo of a {c}."]
    write_tar(tmp_path / "d" / "test" / "10.tar", [("s0000002.png", solid(COLOURS[5])), ("s0000002.cls", b"1")])
    os.utime(tmp_path / "d" / "test" / "10.tar", ns=(1, 1))
    again = load_clip_benchmark(tmp_path / "d")
    assert len(again) == 3 and again.fingerprint != ds.fingerprint


@pytest.mark.parametrize(
    "members, message",
    [
        ([("k1.png", None), ("k1.cls", b"abc")], "not an integer class index"),
        ([("k1.png", None), ("k1.cls", b"7")], "class index 7 outside [0, 3)"),
        ([("k1.png", None)], "no .cls member"),
        ([("k1.cls", b"0")], "no image member"),
        ([("k1.png", None), ("k1.jpg", None), ("k1.cls", b"0")], "two image members"),
        ([("k1.png", b""), ("k1.cls", b"0")], "is empty"),
    ],
)
def test_clip_benchmark_bad_members_name_tar_and_key(tmp_path, members, message):
    make_clip_benchmark(tmp_path / "b")
    bad = [(n, solid(COLOURS[0], n.rsplit(".", 1)[1]) if d is None else d) for n, d in members]
    write_tar(tmp_path / "b" / "test" / "10.tar", bad)
    with pytest.raises(ValueError) as err:
        load_clip_benchmark(tmp_path / "b")
    assert message in str(err.value) and "10.tar" in str(err.value) and "'k1'" in str(err.value)


def test_clip_benchmark_corrupt_tar_and_changed_member_offsets(tmp_path):
    make_clip_benchmark(tmp_path / "c")
    ds = load_clip_benchmark(tmp_path / "c")
    shard = tmp_path / "c" / "test" / "10.tar"
    # the index is stale once the tar shrinks under it: the read comes up short and names the member
    shard.write_bytes(shard.read_bytes()[:1200])
    with pytest.raises(ValueError, match=r"10\.tar: member 's0000003\.webp' is truncated"):
        ds.load(3)
    shard.write_bytes(b"not a tar at all" * 10)
    with pytest.raises(ValueError, match=r"10\.tar: cannot read the tar"):
        load_clip_benchmark(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="train"):
        load_clip_benchmark(tmp_path / "c", split="train")
    (tmp_path / "c" / "classnames.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classnames.txt"):
        load_clip_benchmark(tmp_path / "c")


def test_clip_benchmark_duplicate_key_and_bad_template(tmp_path):
    make_clip_benchmark(tmp_path / "e")
    write_tar(tmp_path / "e" / "test" / "10.tar", [("s0000000.png", solid(COLOURS[0])), ("s0000000.cls", b"0")])
    with pytest.raises(ValueError, match=r"duplicate key 's0000000'.*2\.tar.*10\.tar"):
        load_clip_benchmark(tmp_path / "e")
    make_clip_benchmark(tmp_path / "f")
    (tmp_path / "f" / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na photo.\n")
    with pytest.raises(ValueError, match=r"template 1 'a photo\.'"):
        load_clip_benchmark(tmp_path / "f")


# ----------------------------------------------------------------------------------------------- ImageFolder


def test_image_folder_sorted_classes_files_and_extensions(tmp_path):
    root = tmp_path / "folder"
    layout = {"zebra": ["b.JPG", "a.png"], "apple": ["x.webp"], "Mango": ["sub/y.bmp", "c.GIF", "notes.txt"]}
    colours = {}
    for n, (cls, files) in enumerate(layout.items()):  # created in non-sorted order
        for m, f in enumerate(files):
            p = root / cls / f
            p.parent.mkdir(parents=True, exist_ok=True)
            if f.endswith(".txt"):
                p.write_text("not an image")
                continue
            colours[f"{cls}/{f}"] = COLOURS[(3 * n + m) % len(COLOURS)]
            p.write_bytes(solid(colours[f"{cls}/{f}"], f.rsplit(".", 1)[1]))
    ds = load_image_folder(root, templates=["itap of a {c}."])
    assert ds.classnames == ["Mango", "apple", "zebra"]  # sorted(), as torchvision does
    assert ds.keys == ["Mango/c.GIF", "Mango/sub/y.bmp", "apple/x.webp", "zebra/a.png", "zebra/b.JPG"]
    assert ds.labels.tolist() == [0, 0, 1, 2, 2]
    assert ds.templates == ["itap of a {c}."] and ds.name == "folder"
    for i, key in enumerate(ds.keys):
        assert_colour(ds.load(i), colours[key])
    named = load_image_folder(root, classnames={"Mango": "mango", "apple": "apple", "zebra": "zebra"})
    assert named.classnames == ["mango", "apple", "zebra"] and named.fingerprint != ds.fingerprint
    # an image rewritten in place changes the fingerprint
    (root / "apple" / "x.webp").write_bytes(solid((1, 2, 3), "webp", size=20))
    os.utime(root / "apple" / "x.webp", ns=(5, 5))
    assert load_image_folder(root, templates=["itap of a {c}."]).fingerprint != ds.fingerprint
    (root / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_image_folder(root)


# ----------------------------------------------------------------------------------------------- labelled lists


@pytest.fixture
def image_dir(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        (d / f"im{i}.png").write_bytes(solid(COLOURS[i]))
    return d


def test_csv_with_names_sorted_classes_and_given_order(tmp_path, image_dir):
    lst = tmp_path / "list.csv"
    lst.write_text("filepath,class\nim0.png,dog\nim1.png,cat\nim2.png, dog\nim3.png,bird\n")
    ds = load_labelled_list(lst, image_root=image_dir)
    assert ds.classnames == ["bird", "cat", "dog"] and ds.labels.tolist() == [2, 1, 2, 0] and ds.name == "list"
    assert ds.keys == [f"im{i}.png" for i in range(4)]
    for i in range(4):
        assert_colour(ds.load(i), COLOURS[i])
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\nfish\n")
    given = load_labelled_list(lst, image_root=image_dir, classnames=names)
    assert given.classnames == ["cat", "dog", "bird", "fish"] and given.labels.tolist() == [1, 0, 1, 2]
    names.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=r"list\.csv:5: unknown class name 'bird'"):
        load_labelled_list(lst, image_root=image_dir, classnames=names)
    with pytest.raises(ValueError, match=r"list\.csv:2: class name 'dog' is ambiguous"):
        load_labelled_list(lst, image_root=image_dir, classnames=["cat", "dog", "bird", "dog"])
    # the list file is a source: editing it changes the fingerprint
    lst.write_text("filepath,class\nim0.png,dog\nim1.png,cat\nim2.png,dog\nim3.png,cat\n")
    assert load_labelled_list(lst, image_root=image_dir).fingerprint != ds.fingerprint


def test_jsonl_with_indices_json_and_tsv(tmp_path, image_dir):
    rows = [{"image": f"imgs/im{i}.png", "label": lab} for i, lab in enumerate([1, 0, 1, 2])]
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_labelled_list(jsonl, classnames=["a", "b", "c"])  # paths relative to the list's folder
    assert ds.labels.tolist() == [1, 0, 1, 2] and ds.classnames == ["a", "b", "c"]
    assert_colour(ds.load(2), COLOURS[2])
    as_json = tmp_path / "list.json"
    as_json.write_text(json.dumps(rows))
    assert load_labelled_list(as_json, classnames=["a", "b", "c"]).labels.tolist() == [1, 0, 1, 2]
    tsv = tmp_path / "list.tsv"
    tsv.write_text("path\tlabel\n" + "".join(f"{r['image']}\t{r['label']}\n" for r in rows))
    assert load_labelled_list(tsv, classnames=["a", "b", "c"]).labels.tolist() == [1, 0, 1, 2]
    with pytest.raises(ValueError, match=r"list\.jsonl:4: label index 2 outside \[0, 2\)"):
        load_labelled_list(jsonl, classnames=["a", "b"])
    with pytest.raises(ValueError, match=r"list\.jsonl:1: label 1 looks like an integer index"):
        load_labelled_list(jsonl)
    with pytest.raises(ValueError, match=r"list\.json item 3: label index 2"):
        load_labelled_list(as_json, classnames=["a", "b"])


def test_labelled_list_errors_name_the_row(tmp_path, image_dir):
    lst = tmp_path / "l.csv"
    lst.write_text("image,label\nim0.png,dog\nmissing.png,cat\n")
    with pytest.raises(FileNotFoundError, match=r"l\.csv:3: image .*missing\.png does not exist"):
        load_labelled_list(lst, image_root=image_dir)
    lst.write_text("img,label\nim0.png,dog\n")
    with pytest.raises(ValueError, match=r"l\.csv:2: no image column"):
        load_labelled_list(lst, image_root=image_dir)
    lst.write_text("image,label\nim0.png,dog\nim0.png,cat\n")
    with pytest.raises(ValueError, match=r"duplicate key 'im0\.png': .*l\.csv:2 and .*l\.csv:3"):
        load_labelled_list(lst, image_root=image_dir)
    bad = tmp_path / "l.jsonl"
    bad.write_text('{"image": "im0.png", "label": 0}\n{"image": "im1.png", "label": [1]}\n')
    with pytest.raises(ValueError, match=r"l\.jsonl:2: label \[1\]"):
        load_labelled_list(bad, image_root=image_dir, classnames=["a", "b"])


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_labelled_list_with_a_byte_order_mark_reads_the_same(tmp_path, image_dir, fmt):
    rows = [("im0.png", "dog"), ("im1.png", "cat"), ("im2.png", "dog"), ("im3.png", "bird")]
    if fmt == "jsonl":
        text = "".join(json.dumps({"image": i, "label": lab}) + "\n" for i, lab in rows)
    else:
        sep = "\t" if fmt == "tsv" else ","
        text = f"image{sep}label\n" + "".join(f"{i}{sep}{lab}\n" for i, lab in rows)
    plain = tmp_path / "plain" / f"list.{fmt}"
    bom = tmp_path / "bom" / f"list.{fmt}"
    for path, prefix in ((plain, b""), (bom, b"\xef\xbb\xbf")):
        path.parent.mkdir()
        path.write_bytes(prefix + text.encode())
    a = load_labelled_list(plain, image_root=image_dir)
    b = load_labelled_list(bom, image_root=image_dir)
    assert a.keys == b.keys == [i for i, _ in rows]
    assert a.classnames == b.classnames == ["bird", "cat", "dog"]
    assert a.labels.tolist() == b.labels.tolist() == [2, 1, 2, 0]
    assert a.templates == b.templates and a.name == b.name
    assert [a.load(i) for i in range(len(a))] == [b.load(i) for i in range(len(b))]


def test_fingerprints_do_not_depend_on_where_the_data_lives(tmp_path, image_dir):
    """The same files copied elsewhere (timestamps kept, as copytree does) give the same fingerprint, so the eval
    embedding cache hits in another workdir; a file whose size changed gives another."""
    make_clip_benchmark(tmp_path / "a" / "wds")
    for i, cls in enumerate(["cat", "dog", "cat"]):
        (tmp_path / "a" / "folder" / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / "folder" / cls / f"{i}.png").write_bytes(solid(COLOURS[i]))
    shutil.copytree(image_dir, tmp_path / "a" / "imgs")
    (tmp_path / "a" / "list.csv").write_text("image,label\nimgs/im0.png,dog\nimgs/im1.png,cat\n")
    (tmp_path / "a" / "names.txt").write_text("cat\ndog\n")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")

    def fingerprints(root: Path) -> list[str]:
        return [
            load_clip_benchmark(root / "wds").fingerprint,
            load_image_folder(root / "folder").fingerprint,
            load_labelled_list(root / "list.csv", classnames=root / "names.txt").fingerprint,
        ]

    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    assert fingerprints(a) == fingerprints(b)
    assert load_clip_benchmark(b / "wds").name == "wds/test"
    (b / "wds" / "test" / "2.tar").write_bytes((b / "wds" / "test" / "2.tar").read_bytes() + b"\0" * 512)
    (b / "folder" / "dog" / "1.png").write_bytes(solid(COLOURS[1], size=20))
    (b / "imgs" / "im1.png").write_bytes(solid(COLOURS[1], size=20))
    changed = fingerprints(b)
    assert all(x != y for x, y in zip(fingerprints(a), changed))


# ----------------------------------------------------------------------------------------------- Karpathy


def test_karpathy_split_captions_and_errors(tmp_path):
    root = tmp_path / "coco"
    images = []
    for i, split in enumerate(["test", "train", "test", "val", "test"]):
        folder = "val2014" if i % 2 == 0 else ""
        path = root / folder / f"img{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(solid(COLOURS[i], "jpg"))
        entry = {"filename": f"img{i}.jpg", "split": split, "sentences": [{"raw": f" image {i} caption {k} "} for k in range(5)]}
        if folder:
            entry["filepath"] = folder
        images.append(entry)
    images[4].pop("filepath")
    (root / "img4.jpg").write_bytes(solid(COLOURS[4], "jpg"))
    js = tmp_path / "dataset_coco.json"
    js.write_text(json.dumps({"images": images, "dataset": "coco"}))
    ds = load_karpathy(js, root)
    assert isinstance(ds, RetrievalSet) and ds.name == "dataset_coco/test"
    assert ds.keys == ["val2014/img0.jpg", "val2014/img2.jpg", "img4.jpg"]
    assert ds.captions[1] == [f"image 2 caption {k}" for k in range(5)]
    texts, text_image = ds.flat_captions()
    assert len(texts) == 15 and texts[5] == "image 2 caption 0"
    assert text_image.dtype == np.int64 and text_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    for i, colour in enumerate([COLOURS[0], COLOURS[2], COLOURS[4]]):
        assert_colour(ds.load(i), colour)
    assert load_karpathy(js, root, split="val").keys == ["img3.jpg"]
    with pytest.raises(ValueError, match=r"no images in split 'restval'.*\['test', 'train', 'val'\]"):
        load_karpathy(js, root, split="restval")
    images[2]["sentences"][3]["raw"] = "  "
    js.write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match=r"images\[2\] \(val2014/img2\.jpg\): sentence 3"):
        load_karpathy(js, root)
    images[2]["sentences"][3]["raw"] = "fixed"
    js.write_text(json.dumps({"images": images}))
    assert load_karpathy(js, root).fingerprint != ds.fingerprint  # a caption changed
    (root / "val2014" / "img2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"images\[2\].*img2\.jpg does not exist"):
        load_karpathy(js, root)


# ----------------------------------------------------------------------------------------------- samples/


@pytest.fixture(scope="module")
def synthetic_single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "single"
    ingest(IngestConfig(synthetic=SyntheticConfig(split="single", num_images=20, image_size=64), num_shards=2), out)
    return out


def test_synthetic_classification_matches_the_world(synthetic_single):
    ds = synthetic_classification(synthetic_single)
    world = build_world(0, 30, 10)
    assert ds.classnames == world.unseen and ds.templates == ["a photo of a {c}."]
    assert ds.name == "synthetic-single-unseen" and len(ds) == 20
    table = pq.read_table(output_parts(synthetic_single)[1])
    rows = {r["uid"]: r for r in pq.read_table(output_parts(synthetic_single)[0]).to_pylist() + table.to_pylist()}
    assert ds.keys == sorted(rows)  # shard order, row order
    for i, key in enumerate(ds.keys):
        meta = json.loads(rows[key]["meta"])
        target = next(c for c in meta["creatures"] if c["role"] == "target")
        assert ds.classnames[ds.labels[i]] == target["class"] == world.class_names[rows[key]["label"]]
    for i in (0, 7, 19):  # lazy reads, out of order and back (row-group cache)
        assert ds.load(i) == rows[ds.keys[i]]["image"]
    assert pickle.loads(pickle.dumps(ds.load))(5) == rows[ds.keys[5]]["image"]
    everything = synthetic_classification(synthetic_single, which="all")
    assert everything.classnames == world.class_names
    assert everything.labels.tolist() == [rows[k]["label"] for k in ds.keys]
    assert everything.fingerprint != ds.fingerprint
    with pytest.raises(ValueError, match="rendered from the synthetic world"):
        synthetic_classification(synthetic_single, seed=3)
    with pytest.raises(ValueError, match=r"uid 'syn0-single-\d+' has label \d+, which label_map does not map"):
        synthetic_classification(synthetic_single, which="seen")

    retrieval = load_samples_retrieval(synthetic_single)
    assert retrieval.keys == ds.keys and all(len(c) == 1 and c[0].startswith("a photo of a creature") for c in retrieval.captions)
    assert retrieval.load(3) == ds.load(3)


def test_samples_fingerprints_follow_the_stage_not_the_folder(tmp_path, synthetic_single):
    """A synthetic eval split regenerated in another workdir has the same stage fingerprint and therefore the same
    dataset fingerprints; the part files are not signed."""
    again = tmp_path / "other-workdir" / "single"
    ingest(IngestConfig(synthetic=SyntheticConfig(split="single", num_images=20, image_size=64), num_shards=2), again)
    assert synthetic_classification(again).fingerprint == synthetic_classification(synthetic_single).fingerprint
    assert load_samples_retrieval(again).fingerprint == load_samples_retrieval(synthetic_single).fingerprint
    header = json.loads((again / "_stage.json").read_text())
    (again / "_stage.json").write_text(json.dumps({**header, "fingerprint": "another"}))
    assert synthetic_classification(again).fingerprint != synthetic_classification(synthetic_single).fingerprint
    del header["fingerprint"]
    (again / "_stage.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match=r"_stage\.json has no stage fingerprint"):
        load_samples_retrieval(again)


def test_load_samples_with_null_label_and_swap_pairs(tmp_path, synthetic_single):
    def process(shard, sink):
        for j in range(3):
            sink.write({"uid": f"u{shard.index}-{j}", "image": solid(COLOURS[j]), "width": 16, "height": 16,
                        "caption": "c", "source": "test", "meta": "{}", "label": None if (shard.index, j) == (1, 2) else j})
        return {"rows_in": 3}

    out = tmp_path / "samples"
    run_stage("ingest", out, "fp", [Shard(0), Shard(1)], process, SAMPLES_SCHEMA)
    with pytest.raises(ValueError, match=r"uid 'u1-2' has no label"):
        load_samples(out, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"uid 'u0-2' has dataset label 2 outside \[0, 2\)"):
        load_samples(out, ["a", "b"])
    with pytest.raises(FileNotFoundError, match="not a complete stage output|does not exist"):
        load_samples(tmp_path / "nothing", ["a"])
    with pytest.raises(ValueError, match=r"uid 'syn0-single-0000000' has no swap_truth/swap_foil"):
        swap_pairs(synthetic_single)

    swap = tmp_path / "swap"
    ingest(IngestConfig(synthetic=SyntheticConfig(split="swap", num_images=4, image_size=64), num_shards=1), swap)
    ds = synthetic_classification(swap)
    pairs = swap_pairs(swap)
    world = build_world(0, 30, 10)
    assert list(pairs) == ds.keys
    for label, (truth, foil) in zip(ds.labels, pairs.values()):
        assert truth == world.get(ds.classnames[label]).descriptions()
        assert len(foil) == 3 and sum(t != f for t, f in zip(truth, foil)) == 1


# ----------------------------------------------------------------------------------------------- descriptors


def test_read_descriptor_json_detects_duplicates_and_bad_values(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('{"cat": ["has whiskers"], "dog": ["barks"], "cat": ["meows"]}')
    with pytest.raises(ValueError, match=r"d\.json: duplicate key 'cat'"):
        read_descriptor_json(p)
    p.write_text('{"cat": ["has whiskers"], "dog": "barks"}')
    with pytest.raises(ValueError, match=r"class 'dog' maps to str"):
        read_descriptor_json(p)
    p.write_text('{"cat": ["has whiskers", 3]}')
    with pytest.raises(ValueError, match=r"class 'cat' descriptor 1"):
        read_descriptor_json(p)
    p.write_text('{"cat": [')
    with pytest.raises(ValueError, match=r"d\.json: not valid JSON"):
        read_descriptor_json(p)
    p.write_text('{"b": ["x"], "a": ["y", "z"]}')
    assert list(read_descriptor_json(p).items()) == [("b", ["x"]), ("a", ["y", "z"])]


def test_align_descriptors_is_order_independent_and_normalises(tmp_path):
    classnames = ["golden retriever", "tabby cat", "Tench", "crane bird"]
    descriptors = {
        "Golden_Retriever": ["golden fur", " a friendly dog "],
        "tabby cat": ["striped coat"],
        "tench": ["a freshwater fish", "  "],
        "crane-bird": ["long legs"],
    }
    want = [["golden fur", "a friendly dog"], ["striped coat"], ["a freshwater fish"], ["long legs"]]
    assert align_descriptors(classnames, descriptors) == want
    items = list(descriptors.items())
    for seed in range(5):
        random.Random(seed).shuffle(items)
        p = tmp_path / f"shuffled{seed}.json"
        p.write_text(json.dumps(dict(items)))
        assert align_descriptors(classnames, read_descriptor_json(p)) == want
    assert normalise_name("  Golden_Retriever-dog ") == "golden retriever dog"


def test_align_descriptors_errors_name_the_classes():
    base = {"cat": ["whiskers"], "dog": ["barks"]}
    with pytest.raises(ValueError, match=r"my.json: no descriptors for 1: 'fish' of 3 classes"):
        align_descriptors(["cat", "dog", "fish"], base, where="my.json")
    assert align_descriptors(["cat", "dog", "fish"], base, on_missing="empty") == [["whiskers"], ["barks"], []]
    many = [f"class{i}" for i in range(15)]
    with pytest.raises(ValueError, match=r"no descriptors for 15: 'class0', .*'class9' … and 5 more"):
        align_descriptors(many + ["cat", "dog"], base)
    with pytest.raises(ValueError, match=r"keys that match no class \(1: 'dog'\)"):
        align_descriptors(["cat"], base)
    assert align_descriptors(["cat"], base, on_extra="ignore") == [["whiskers"]]
    with pytest.raises(ValueError, match=r"empty descriptor lists for 1: 'dog'"):
        align_descriptors(["cat", "dog"], {"cat": ["whiskers"], "dog": [" ", ""]})
    assert align_descriptors(["cat", "dog"], {"cat": ["whiskers"], "dog": []}, on_empty="names") == [["whiskers"], []]
    with pytest.raises(ValueError, match=r"class name 'crane' occurs 2 times in classnames \(indices \[1, 3\]\)"):
        align_descriptors(["cat", "crane", "dog", "crane"], {"cat": ["a"], "crane": ["b"], "dog": ["c"]})
    with pytest.raises(ValueError, match=r"class 'golden retriever' \(index 0\) is matched by two keys"):
        align_descriptors(["golden retriever"], {"golden retriever": ["a"], "Golden_Retriever": ["b"]})
    with pytest.raises(ValueError, match=r"key 'CRANE' matches several classes.*'Crane' \(index 0\), 'crane' \(index 1\)"):
        align_descriptors(["Crane", "crane"], {"crane": ["a"], "CRANE": ["b"]})
    # distinct names that only collide after normalisation are fine while every key matches exactly
    assert align_descriptors(["Crane", "crane"], {"crane": ["b"], "Crane": ["a"]}) == [["a"], ["b"]]


def test_descriptor_sentence_rules_and_prompts():
    assert descriptor_sentence("tench", "a freshwater fish") == "a photo of a tench, which is a freshwater fish."
    assert descriptor_sentence("knife", "used for cutting.") == "a photo of a knife, which is used for cutting."
    assert descriptor_sentence("owl", "often seen at night") == "a photo of a owl, which often seen at night."
    assert descriptor_sentence("cat", "Has whiskers") == "a photo of a cat, which Has whiskers."
    assert descriptor_sentence("cat", "can climb trees") == "a photo of a cat, which can climb trees."
    assert descriptor_sentence("dog", "long floppy ears") == "a photo of a dog, which has long floppy ears."
    assert descriptor_sentence("dog", "fur", template="itap of the {c}...") == "itap of the dog, which has fur."
    with pytest.raises(ValueError, match="blank descriptor"):
        descriptor_sentence("dog", " . ")
    with pytest.raises(ValueError, match="does not contain"):
        descriptor_sentence("dog", "fur", template="a photo")
    assert descriptor_prompts(["cat", "dog"], [["whiskers"], []]) == [
        ["a photo of a cat, which has whiskers."],
        ["a photo of a dog."],
    ]
