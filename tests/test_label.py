"""The labelling job end to end on the DirectRunner, with tiny random-weight DPT-Hybrid models built offline."""

from __future__ import annotations

import io
import json
import os
import tarfile

import apache_beam  # noqa: F401 - a required test dependency
import numpy as np
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image

from jointnet_jax.data import label, records  # noqa: E402
from jointnet_jax.data.depth_estimator import (  # noqa: E402
    DepthEstimator,
    DPTForNormalEstimation,
    encode_normals,
    normalize_relative_inverse_depth,
    tiny_hybrid_config,
)

TINY = 64  # model input size: a 4x4 patch grid after the BiT stem's 16x downsampling
MIN_SIDE = 32


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[str, str]:
    """(depth, normal) model folders with processors resizing to the tiny input size."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    processor = transformers.DPTImageProcessor(
        size={"height": TINY, "width": TINY}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    paths = []
    for name, model_class in (("depth", transformers.DPTForDepthEstimation), ("normal", DPTForNormalEstimation)):
        model = model_class(tiny_hybrid_config(TINY))
        with torch.no_grad():  # a random head ends in a ReLU and barely varies: lift and spread its output
            model.head.head[-2].bias.fill_(0.5)
            model.head.head[-2].weight.mul_(300.0)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


def make_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    return np.clip(ramp + rng.integers(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def encoded(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def save(path, image: np.ndarray) -> np.ndarray:
    """Write ``image`` (format from the suffix) and return the pixels a reader decodes from it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def common_args(out, depth_dir) -> list[str]:
    return ["--out", str(out), "--depth-model", depth_dir, "--min-side", str(MIN_SIDE), "--batch-size", "2"]


def check_example(example: records.Example, image: np.ndarray | None = None) -> None:
    assert example.depth.shape == example.image.shape[:2]
    assert 0.0 <= example.depth.min() and example.depth.max() <= 1.0
    assert example.depth.max() == 1.0 and example.depth.min() == 0.0  # min-max normalised, not constant
    if image is not None:
        np.testing.assert_array_equal(example.image, image)


def test_folder_input_counts_records_and_resume(tmp_path, model_dirs, capsys):
    root, out = tmp_path / "photos", tmp_path / "out"
    images = {
        "a.png": save(root / "a.png", make_image(48, 40, 0)),
        "sub/b.jpg": save(root / "sub" / "b.jpg", make_image(40, 56, 1)),
        "sub/c.png": save(root / "sub" / "c.png", make_image(64, 64, 2)),
    }
    (root / "a.txt").write_text("a red cube\n")
    (root / "sub" / "c.txt").write_text("a sphere")
    save(root / "small.png", make_image(24, 40, 3))  # filtered: shorter side < 32
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # failed
    (root / "notes.md").write_text("not an image")
    argv = [
        "--input",
        str(root),
        "--input-format",
        "folder",
        "--examples-per-shard",
        "2",
        *common_args(out, model_dirs[0]),
    ]

    counts = label.main([*argv, "--runner", "DirectRunner"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == counts
    assert {k: counts[k] for k in ("read", "filtered", "failed", "written", "filtered_size")} == {
        "read": 5,
        "filtered": 1,
        "failed": 1,
        "written": 3,
        "filtered_size": 1,
    }
    assert (counts["shards"], counts["shards_written"], counts["shards_skipped"]) == (3, 3, 0)
    shards = records.list_shards(out)
    assert [os.path.basename(p) for p in shards] == [records.shard_name("labelled", i, 3) for i in range(3)]
    assert sorted(os.listdir(out)) == sorted(map(os.path.basename, shards))  # no temporaries left behind
    examples = {example.key: example for example in records.RecordReader(out)}
    assert sorted(examples) == sorted(images)
    assert {key: example.caption for key, example in examples.items()} == {
        "a.png": "a red cube",
        "sub/b.jpg": "",
        "sub/c.png": "a sphere",
    }
    for key, example in examples.items():
        check_example(example, images[key])
        assert example.normal is None and example.watermark is None
        assert os.path.relpath(example.source, root) == key

    mtimes = {path: os.stat(path).st_mtime_ns for path in shards}
    again = label.run(argv)
    assert (again["shards_skipped"], again["read"], again["written"]) == (3, 0, 0)
    os.remove(shards[1])
    again = label.run(argv)
    assert (again["shards_skipped"], again["shards_written"], again["read"], again["written"]) == (2, 1, 2, 1)
    assert all(os.stat(path).st_mtime_ns == mtimes[path] for path in (shards[0], shards[2]))
    assert len(records.RecordReader(out)) == 3
    with pytest.raises(FileExistsError, match="different split"):
        label.run([*argv[:4], "--examples-per-shard", "1", *argv[6:]])


def write_list(path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        columns = sorted({column for row in rows for column in row})
        lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow
        import pyarrow.parquet

        columns = sorted({column for row in rows for column in row})
        table = pyarrow.table({c: [row.get(c) for row in rows] for c in columns})
        pyarrow.parquet.write_table(table, path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_list_input_metadata_filters(tmp_path, model_dirs, suffix):
    for seed, name in enumerate("abcde"):
        save(tmp_path / "img" / f"{name}.png", make_image(48, 64, seed))
    (tmp_path / "img" / "corrupt.png").write_bytes(encoded(make_image(48, 48, 9))[:60])
    scores = {"watermark_score": 0.1, "aesthetic_score": 6.0, "clip_similarity": 0.3, "width": 64, "height": 48}
    rows = [
        {"path": "img/a.png", "caption": "kept with scores", **scores},
        {"path": "img/b.png", "text": "kept without scores (COYO's caption column)"},
        {"path": "img/c.png", "caption": "watermarked", **scores, "watermark_score": 0.9},
        {"path": "img/d.png", "caption": "ugly", **scores, "aesthetic_score": 4.0},
        {"path": "img/e.png", "caption": "listed as small", **scores, "width": 20},
        {"path": "img/missing.png", "caption": "no such file"},
        {"path": "img/corrupt.png", "caption": "truncated", "key": "broken"},
    ]
    list_path = tmp_path / f"list{suffix}"
    write_list(list_path, rows)
    out = tmp_path / "out"
    argv = ["--input", str(list_path), "--input-format", "list", "--resolution", "32", *common_args(out, model_dirs[0])]

    counts = label.run(argv)
    expected = {"read": 7, "filtered": 3, "failed": 2, "written": 2, "shards": 1}
    assert {key: counts[key] for key in expected} == expected
    assert counts["filtered_watermark"] == counts["filtered_aesthetic"] == counts["filtered_size"] == 1
    examples = {example.key: example for example in records.RecordReader(out)}
    assert sorted(examples) == ["img/a.png", "img/b.png"]
    first, second = examples["img/a.png"], examples["img/b.png"]
    assert (first.caption, second.caption) == ("kept with scores", "kept without scores (COYO's caption column)")
    assert (
        first.watermark == pytest.approx(0.1) and first.aesthetic == 6.0 and first.clip_similarity == pytest.approx(0.3)
    )
    assert second.watermark is second.aesthetic is second.clip_similarity is None
    for example in examples.values():
        assert example.image.shape == (32, 43, 3)  # shorter side resized to --resolution, aspect kept
        check_example(example)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_input_with_normals(tmp_path, model_dirs):
    shards = tmp_path / "wds"
    shards.mkdir()
    pixels = {}
    with tarfile.open(shards / "part-0.tar", "w") as tar:
        pixels["part-0/s0"] = make_image(40, 48, 0)
        add_member(tar, "s0.jpg", encoded(pixels["part-0/s0"], "JPEG"))
        add_member(tar, "s0.txt", b"zero")
        pixels["part-0/s1"] = make_image(48, 40, 1)
        add_member(tar, "s1.png", encoded(pixels["part-0/s1"]))
        add_member(
            tar, "s1.json", json.dumps({"caption": "one", "watermark_score": 0.2, "aesthetic_score": 7}).encode()
        )
        add_member(tar, "s2.jpg", b"corrupt")  # failed
        add_member(tar, "s2.txt", b"two")
        add_member(tar, "s3.json", b'{"caption": "no image"}')  # failed
        add_member(tar, "s4.png", encoded(make_image(40, 40, 4)))  # filtered by its json
        add_member(tar, "s4.json", b'{"watermark_score": 0.7}')
    with tarfile.open(shards / "part-1.tar", "w") as tar:
        pixels["part-1/x"] = make_image(36, 36, 5)
        add_member(tar, "x.png", encoded(pixels["part-1/x"]))
    (shards / "part-2.tar").write_bytes(b"this is not a tar file" * 40)  # one failure, empty shard
    out = tmp_path / "out"
    argv = [
        "--input",
        str(shards),
        "--input-format",
        "wds",
        "--normal-model",
        model_dirs[1],
        *common_args(out, model_dirs[0]),
    ]

    counts = label.run(argv)
    expected = {"read": 7, "filtered": 1, "failed": 3, "written": 3, "shards": 3, "shards_written": 3}
    assert {key: counts[key] for key in expected} == expected
    assert [len(records.RecordReader(path)) for path in records.list_shards(out)] == [2, 1, 0]
    examples = {example.key: example for example in records.RecordReader(out)}
    assert sorted(examples) == sorted(pixels)
    assert [examples[key].caption for key in sorted(examples)] == ["zero", "one", ""]
    assert examples["part-0/s1"].watermark == pytest.approx(0.2) and examples["part-0/s1"].aesthetic == 7.0
    np.testing.assert_array_equal(examples["part-0/s1"].image, pixels["part-0/s1"])
    for example in examples.values():
        check_example(example)
        assert example.normal.shape == example.image.shape and example.normal.dtype == np.uint8
        norms = np.linalg.norm(example.normal / 127.5 - 1.0, axis=-1)
        np.testing.assert_allclose(norms, 1.0, atol=0.02)


def test_estimator_matches_the_hf_model(model_dirs):
    estimator = DepthEstimator.from_pretrained(model_dirs[0])
    images = [make_image(48, 40, 0), make_image(40, 72, 1)]
    labels = estimator(images)
    model = transformers.DPTForDepthEstimation.from_pretrained(model_dirs[0]).eval()
    processor = transformers.DPTImageProcessor.from_pretrained(model_dirs[0])
    for image, (depth, normal) in zip(images, labels, strict=True):
        with torch.no_grad():
            prediction = model(**processor(images=image, return_tensors="pt")).predicted_depth
        prediction = torch.nn.functional.interpolate(prediction[None], size=image.shape[:2], mode="bicubic")
        prediction = prediction[0, 0].numpy().astype(np.float64)
        expected = (prediction - prediction.min()) / (prediction.max() - prediction.min())
        assert normal is None and depth.dtype == np.float32 and depth.shape == image.shape[:2]
        np.testing.assert_allclose(depth, expected, atol=1e-5)


def test_normalisation_and_normal_encoding():
    ramp = np.arange(101, dtype=np.float32).reshape(1, 101)
    np.testing.assert_allclose(normalize_relative_inverse_depth(ramp), ramp / 100, atol=1e-7)
    robust = normalize_relative_inverse_depth(ramp, percentile=10.0)
    assert robust[0, 10] == 0.0 and robust[0, 90] == 1.0 and robust[0, 0] == 0.0 and robust[0, 50] == 0.5
    assert not normalize_relative_inverse_depth(np.full((3, 3), 7.0)).any()
    towards_camera = np.stack([np.full((2, 2), 0.5), np.full((2, 2), 0.5), np.full((2, 2), 0.9)])
    np.testing.assert_array_equal(encode_normals(towards_camera), np.full((2, 2, 3), [128, 128, 255], np.uint8))


def test_filter_rules():
    rules = label.FilterRules()
    assert rules.reject_metadata({}) is None  # missing scores pass by default
    assert label.FilterRules(drop_missing=True).reject_metadata({"watermark": 0.1}) == "missing_metadata"
    assert rules.reject_metadata({"width": 1024, "height": 511}) == "size"
    assert rules.reject_metadata({"watermark": 0.5}) == "watermark"  # paper: watermark < 0.5
    assert rules.reject_metadata({"aesthetic": 5.0}) == "aesthetic"  # paper: aesthetic > 5
    assert rules.reject_metadata({"width": 512, "height": 600, "watermark": 0.49, "aesthetic": 5.1}) is None
    assert label.FilterRules(None, None, None).reject_metadata({"watermark": 1.0, "aesthetic": 0.0}) is None
    assert rules.reject_size(500, 800) == "size" and rules.reject_size(512, 512) is None
    assert label.metadata({"watermark_score": "", "aesthetic_score_laion_v2": "5.5", "width": float("nan")}) == {
        "aesthetic": 5.5
    }


def test_16bit_images_keep_their_range_and_keys_keep_the_extension(tmp_path, model_dirs):
    """A 16-bit grey ramp (0..65535) is stored as the 8-bit ramp it is (65535 -> 255), not clipped to white;
    ``good.png`` and ``good.jpg`` get distinct keys."""
    root, out = tmp_path / "photos", tmp_path / "out"
    ramp16 = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (48, 1))
    root.mkdir()
    Image.fromarray(ramp16).save(root / "ramp16.png")
    assert Image.open(root / "ramp16.png").mode.startswith("I;16")
    same = make_image(40, 40, 7)
    Image.fromarray(same).save(root / "good.png")
    Image.fromarray(same).save(root / "good.jpg", quality=95)
    counts = label.run(["--input", str(root), "--input-format", "folder", *common_args(out, model_dirs[0])])
    assert (counts["written"], counts["failed"]) == (3, 0)
    examples = {example.key: example for example in records.RecordReader(out)}
    assert sorted(examples) == ["good.jpg", "good.png", "ramp16.png"]
    stored = examples["ramp16.png"].image
    expected = np.round(ramp16.astype(np.float64) / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(stored, np.repeat(expected[..., None], 3, axis=-1))
    assert (stored == 255).mean() < 0.05 and stored.min() == 0


def test_inputs_with_one_key_are_refused_before_any_work(tmp_path, model_dirs):
    for name in ("a", "b"):
        save(tmp_path / "img" / f"{name}.png", make_image(48, 48, 0))
    list_path = tmp_path / "list.jsonl"
    write_list(list_path, [{"path": "img/a.png", "key": "same"}, {"path": "img/b.png", "key": "same"}])
    with pytest.raises(ValueError, match=r"img/a.png and .*img/b.png would both get the record key 'same'"):
        label.run(["--input", str(list_path), "--input-format", "list", *common_args(tmp_path / "out", model_dirs[0])])
    assert not (tmp_path / "out").exists()
