"""grain.data.files, the one I/O layer under ingest and evaluate: both must read the same bytes the same way.

An image, a tar or a list file given to ingest (→ samples/ → the train loader) and to an eval adapter (→
grain.train.data.load_image, as grain.evaluate.zeroshot.encode_images does) must give the same keys, rows and
pixels.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grain.config import IngestConfig
from grain.data.files import TarReadError, TextRule, file_signature, iter_table_rows, iter_tar_members, split_member_name
from grain.data.images import normalise_image
from grain.data.ingest import ingest
from grain.data.readers import input_signature, read_webdataset_tar
from grain.evaluate.datasets import load_clip_benchmark, load_image_folder
from grain.shards import output_parts
from grain.train.data import image_tensor, load_image

SIZE = 32
from support.tars import write_tar


def rgba_png() -> tuple[bytes, Image.Image]:
    """A 40x24 RGBA PNG: opaque blue on the left, red fading from opaque to fully transparent on the right."""
    arr = np.zeros((24, 40, 4), dtype=np.uint8)
    arr[:, :20] = (20, 40, 220, 255)
    arr[:, 20:, 0] = 200
    arr[:, 20:, 3] = np.linspace(255, 0, 20).astype(np.uint8)[None, :]
    img = Image.fromarray(arr, mode="RGBA")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), img


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- images


def test_an_rgba_png_gives_the_same_tensor_through_ingest_and_through_evaluate(tmp_path):
    data, rgba = rgba_png()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(data)
    (tmp_path / "in" / "list.csv").write_text("image,caption\na.png,a fading red square\n")
    ingest(IngestConfig(source="csv", path=str(tmp_path / "in" / "list.csv"), num_shards=1), tmp_path / "samples")
    stored = pq.read_table(output_parts(tmp_path / "samples")[0]).column("image").to_pylist()
    assert len(stored) == 1
    through_ingest = load_image(stored[0], SIZE)
    assert np.array_equal(through_ingest, load_image(normalise_image(data).data, SIZE))  # what ingest stores

    (tmp_path / "eval" / "fading").mkdir(parents=True)
    (tmp_path / "eval" / "fading" / "a.png").write_bytes(data)
    ds = load_image_folder(tmp_path / "eval")
    through_eval = load_image(ds.load(0), SIZE)
    assert np.array_equal(through_ingest, through_eval)

    # the rule is "composited on white": on black (or alpha dropped) the tensor would differ
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    on_black = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    assert np.array_equal(np.asarray(ds.image(0)), np.asarray(on_white))
    assert np.array_equal(through_eval, image_tensor(on_white, SIZE))
    assert not np.array_equal(through_eval, image_tensor(on_black, SIZE))
    assert not np.array_equal(through_eval, image_tensor(rgba.convert("RGB"), SIZE))


# ----------------------------------------------------------------------------------------------- tars


def test_member_names_split_by_webdatasets_rule():
    assert split_member_name("a/b.c.jpg") == ("a/b", "c.jpg")
    assert split_member_name("x.v2/s1.JPG") == ("x.v2/s1", "jpg")  # a dot in a folder is not a split point
    assert split_member_name("./s1.png") == ("s1", "png")
    assert split_member_name("_s1.cls") == ("_s1", "cls")
    for not_a_field in ("README", "a/.hidden.jpg", "a/._s1.jpg", "a/b."):
        assert split_member_name(not_a_field) is None


def test_ingest_and_evaluate_see_the_same_keys_in_one_tar(tmp_path):
    members: list[tuple[str, bytes]] = []
    for n, (key, ext) in enumerate([("dir/s1", "jpg"), ("dir.v2/s2", "png"), ("./s3", "webp"), ("_s4", "png")]):
        members += [(f"{key}.{ext}", png((40 * n, 20, 200))), (f"{key}.cls", str(n % 2).encode()), (f"{key}.txt", f"caption {n}".encode())]
    members += [("dir/s1.meta.json", b"{}"), ("dir/._s1.jpg", b"resource fork")]
    write_tar(tmp_path / "wds" / "test" / "0.tar", members)
    (tmp_path / "wds" / "classnames.txt").write_text("even\nodd\n")

    ingested = list(read_webdataset_tar(tmp_path / "wds" / "test" / "0.tar"))
    evaluated = load_clip_benchmark(tmp_path / "wds")
    assert [r.uid for r in ingested] == evaluated.keys == ["dir/s1", "dir.v2/s2", "s3", "_s4"]
    assert all(r.problem is None for r in ingested)
    assert [r.image for r in ingested] == [evaluated.load(i) for i in range(len(evaluated))]

    # a multi-dot name is key a/b with extension c.jpg on both sides: not an image member for either
    write_tar(tmp_path / "wds" / "test" / "0.tar", [("a/b.c.jpg", png((1, 2, 3))), ("a/b.cls", b"0"), ("a/b.txt", b"x")])
    (record,) = read_webdataset_tar(tmp_path / "wds" / "test" / "0.tar")
    assert record.uid == "a/b" and record.problem is not None and record.problem[0] == "missing_image"
    with pytest.raises(ValueError, match=r"0\.tar key 'a/b': no image member"):
        load_clip_benchmark(tmp_path / "wds")


def test_the_tar_scanner_yields_what_it_read_before_a_break(tmp_path):
    tar = tmp_path / "t.tar"
    write_tar(tar, [(f"k{i}.png", png((10 * i, 0, 0))) for i in range(6)])
    full = list(iter_tar_members(tar, read_exts=()))
    assert [m.key for m in full] == [f"k{i}" for i in range(6)] and all(m.data is None for m in full)
    with open(tar, "rb") as fh:  # offsets and sizes address each member's bytes in the file
        fh.seek(full[2].offset)
        assert fh.read(full[2].size) == png((20, 0, 0))
    tar.write_bytes(tar.read_bytes()[: full[3].offset + 10])
    seen = []
    with pytest.raises(TarReadError, match=r"t\.tar: cannot read the tar") as err:
        for member in iter_tar_members(tar):
            seen.append(member.key)
    assert seen == ["k0", "k1", "k2"] and err.value.reason


# ----------------------------------------------------------------------------------------------- tables


def test_table_rows_drop_a_bom_and_keep_unusable_rows(tmp_path):
    csv_path = tmp_path / "l.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfimage, caption\na.png,one\nb.png,two,extra\n\nc.png,caf\xe9\n")
    rows = list(iter_table_rows(csv_path))
    assert [r.where for r in rows] == [f"{csv_path}:2", f"{csv_path}:3", f"{csv_path}:5"]
    assert rows[0].value == {"image": "a.png", "caption": "one"} and rows[0].problem is None
    assert rows[1].problem == "3 fields but the header has 2"
    # invalid UTF-8 is never replaced: the row is unusable (bad_text), its field shown with escapes, the byte named
    assert rows[2].reason == "bad_text" and rows[2].value["caption"] == "caf\\xe9"
    assert "column 'caption' is not valid utf-8: byte e9 at offset 3" in rows[2].problem
    # ...or decoded by a fallback encoding the user names, and the row says so
    rows = list(iter_table_rows(csv_path, TextRule("utf-8", "cp1252")))
    assert rows[2].value["caption"] == "caf\u00e9" and rows[2].problem is None
    assert rows[2].changes == ("text_decoded:cp1252 (column 'caption')",)
    assert rows[0].changes == () and rows[1].reason == "bad_row"

    jsonl = tmp_path / "l.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"image": "a.png"}\n[1, 2]\n{broken\n')
    rows = list(iter_table_rows(jsonl))
    assert rows[0].value == {"image": "a.png"} and rows[0].problem is None
    assert rows[1].value == "[1, 2]\n" and rows[1].problem == "expected a JSON object, got list"
    assert rows[2].value == "{broken\n" and rows[2].problem.startswith("not valid JSON")

    as_list = tmp_path / "l.json"
    as_list.write_text(json.dumps([{"image": "a.png"}, 3]))
    rows = list(iter_table_rows(as_list))
    assert [r.where for r in rows] == [f"{as_list} item 0", f"{as_list} item 1"] and rows[1].value == "3"
    as_list.write_text('{"image": "a.png"}\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"l\.json: not valid JSON"):
        list(iter_table_rows(as_list))
    with pytest.raises(ValueError, match=r"l\.txt: unknown list format"):
        list(iter_table_rows(tmp_path / "l.txt"))


# ----------------------------------------------------------------------------------------------- signatures


def test_signatures_are_relative_to_the_data_root(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "x.png").write_bytes(b"12345")
    (tmp_path / "names.txt").write_text("cat\n")
    sig = file_signature([tmp_path / "a" / "sub" / "x.png", tmp_path / "names.txt"], tmp_path / "a")
    assert [s[:2] for s in sig] == [["sub/x.png", 5], ["../names.txt", 4]]
    with pytest.raises(FileNotFoundError, match="nope.png does not exist"):
        file_signature([tmp_path / "a" / "nope.png"], tmp_path / "a")


def test_ingest_input_signature_does_not_depend_on_where_the_input_lives(tmp_path):
    write_tar(tmp_path / "a" / "wds" / "00000.tar", [("k.png", png((1, 2, 3))), ("k.txt", b"c")])
    (tmp_path / "a" / "list.csv").write_text("image,caption\nk.png,c\n")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for sub, source in (("wds", "webdataset"), ("list.csv", "csv")):
        sig_a = input_signature(IngestConfig(source=source, path=str(tmp_path / "a" / sub)))
        sig_b = input_signature(IngestConfig(source=source, path=str(tmp_path / "b" / sub)))
        assert sig_a == sig_b and str(tmp_path) not in json.dumps(sig_a)
    assert input_signature(IngestConfig(source="csv", path=str(tmp_path / "a" / "list.csv")))["files"][0][0] == "list.csv"
