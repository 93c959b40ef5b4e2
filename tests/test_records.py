"""Record format: round trips, validation, corruption, atomic shard writing and TFDS interop."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jointnet_jax.data import records, synthetic
from jointnet_jax.data.records import Example, RecordError


def _example(key="k0", size=(6, 5), normal=True, **scores):
    rng = np.random.default_rng(len(key))
    return Example(
        key=key,
        caption="a red sphere — ünïcode",
        image=rng.integers(0, 256, (*size, 3), dtype=np.uint8),
        depth=rng.random(size).astype(np.float32),
        normal=rng.integers(0, 256, (*size, 3), dtype=np.uint8) if normal else None,
        source="unit-test",
        **scores,
    )


def test_round_trip_all_fields():
    example = _example(watermark=0.25, aesthetic=6.5, clip_similarity=float("nan"))
    decoded = records.decode_example(records.encode_example(example))
    assert (decoded.key, decoded.caption, decoded.source) == (example.key, example.caption, example.source)
    np.testing.assert_array_equal(decoded.image, example.image)
    np.testing.assert_array_equal(decoded.normal, example.normal)
    assert decoded.depth.dtype == np.float32 and decoded.depth.shape == (6, 5)
    assert np.abs(decoded.depth - example.depth).max() <= 1.0 / 65535
    assert (decoded.width, decoded.height) == (5, 6)
    assert (decoded.watermark, decoded.aesthetic, decoded.clip_similarity) == (0.25, 6.5, None)
    without_normal = records.decode_example(records.encode_example(_example(normal=False)))
    assert without_normal.normal is None and without_normal.watermark is None


def test_depth_png_is_16_bit_and_exact_on_the_grid():
    grid = (np.arange(65536, dtype=np.float64) / 65535).reshape(256, 256)
    np.testing.assert_array_equal(records.decode_depth_png(records.encode_depth_png(grid)), grid.astype(np.float32))


def test_jpeg_images_decode():
    """JPEG records decode to the pixels Pillow decodes from the same JPEG bytes, and those are close to the
    original (lossy, so within a few levels on a smooth image)."""
    import io

    from PIL import Image
    from tensorflow_datasets.proto import tf_example_pb2

    example = _example(size=(16, 16))
    yy, xx = np.mgrid[0:16, 0:16]
    example.image = np.stack([yy * 16, xx * 16, (yy + xx) * 8], -1).astype(np.uint8)  # smooth ramps
    encoded = records.encode_example(example, image_format="jpeg")
    decoded = records.decode_example(encoded)
    assert decoded.image.shape == (16, 16, 3) and decoded.image.dtype == np.uint8
    proto = tf_example_pb2.Example.FromString(encoded)
    jpeg = proto.features.feature["image"].bytes_list.value[0]
    assert jpeg[:2] == b"\xff\xd8"  # really stored as JPEG
    np.testing.assert_array_equal(decoded.image, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    assert np.abs(decoded.image.astype(int) - example.image).mean() < 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": np.zeros((6, 5, 3), np.float32)}, "uint8 HxWx3"),
        ({"depth": np.zeros((5, 6), np.float32)}, "matching the image"),
        ({"depth": np.full((6, 5), 1.5)}, r"within \[0, 1\]"),
        ({"normal": np.zeros((6, 4, 3), np.uint8)}, "sizes must match"),
        ({"key": 3}, "key must be a str"),
        ({"aesthetic": "high"}, "aesthetic must be a float"),
    ],
)
def test_invalid_examples_are_rejected_with_a_clear_error(change, message):
    example = _example()
    for name, value in change.items():
        setattr(example, name, value)
    with pytest.raises((ValueError, TypeError), match=message):
        records.encode_example(example)


def test_corrupt_records_raise_record_error():
    good = records.encode_example(_example())
    for bad in (b"\xff" * 40, good[: len(good) // 2], good.replace(b"IDAT", b"IDAX", 1), b""):
        with pytest.raises(RecordError):
            records.decode_example(bad)


def test_shards_round_trip_and_random_access(tmp_path):
    examples = [_example(f"k{i}") for i in range(7)]
    paths = records.write_shards(examples, tmp_path, "train", num_shards=3)
    assert [os.path.basename(p) for p in paths] == [f"train-0000{i}-of-00003.array_record" for i in range(3)]
    reader = records.RecordReader(tmp_path)
    assert len(reader) == 7
    assert sorted(example.key for example in reader) == sorted(example.key for example in examples)
    assert reader[-1].key == reader[6].key
    raw = records.RecordReader(str(tmp_path / "train-*"), decode=False)
    assert records.decode_example(raw[2]).key == reader[2].key
    assert [e.key for e in reader.__getitems__([0, 5])] == [reader[0].key, reader[5].key]
    with pytest.raises(IndexError):
        reader[7]
    sized = records.write_shards(examples, tmp_path, "val", examples_per_shard=3)
    assert [os.path.basename(p) for p in sized] == [f"val-0000{i}-of-00003.array_record" for i in range(3)]
    assert len(records.RecordReader(sized)) == 7
    with pytest.raises(FileExistsError):
        records.write_shards(examples, tmp_path, "val", num_shards=1)
    records.write_shards(examples[:2], tmp_path, "val", num_shards=1, overwrite=True)
    assert sorted(os.listdir(tmp_path)).count("val-00000-of-00001.array_record") == 1
    assert len(records.list_shards(tmp_path, "val")) == 1


def test_reader_works_as_grain_source(tmp_path):
    import grain

    records.write_shards([_example(f"k{i}") for i in range(4)], tmp_path, "g", num_shards=2)
    dataset = grain.MapDataset.source(records.RecordReader(tmp_path)).map(lambda e: e.key)
    assert sorted(dataset) == ["k0", "k1", "k2", "k3"]


def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), records.ShardWriter(tmp_path, "crash", num_shards=2) as writer:
        writer.write(_example())
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_killed_writer_leaves_no_final_file_and_reader_ignores_temp(tmp_path):
    records.write_shards([_example("done")], tmp_path, "old", num_shards=1)
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from jointnet_jax.data import records
        example = records.Example("k", "c", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32))
        with records.ShardWriter({str(tmp_path)!r}, "killed", num_shards=2) as writer:
            for _ in range(3):
                writer.write(example)
            print("ready", flush=True)
            time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    names = os.listdir(tmp_path)
    assert not any(name.startswith("killed") for name in names)
    assert any(name.startswith(".killed") for name in names)
    assert [example.key for example in records.RecordReader(tmp_path)] == ["done"]


def test_record_bytes_match_tfds_serialisation():
    import tensorflow_datasets as tfds
    from tensorflow_datasets.proto import tf_example_pb2

    from jointnet_jax.data import tfds_builder

    example = synthetic.make_example(1, 16)
    features = tfds_builder.features(with_normal=True)
    serializer = tfds.core.example_serializer.ExampleSerializer(features.get_serialized_info())
    tfds_bytes = serializer.serialize_example(features.encode_example(records.example_to_features(example)))
    ours = tf_example_pb2.Example.FromString(records.encode_example(example))
    assert ours == tf_example_pb2.Example.FromString(tfds_bytes)


def test_tfds_data_source_reads_written_dataset(tmp_path):
    import tensorflow_datasets as tfds

    from jointnet_jax.data import tfds_builder

    examples = [synthetic.make_example(i, 16) for i in range(5)]
    tfds_builder.write_tfds_dataset(examples, tmp_path, "toy_rgbd", num_shards=2)
    source = tfds.data_source("toy_rgbd", data_dir=tmp_path, decoders={"depth": tfds.decode.SkipDecoding()})
    train = source["train"]
    assert len(train) == 5
    by_key = {example.key: example for example in examples}
    for index in range(5):
        item = train[index]
        expected = by_key[item["key"].decode()]
        np.testing.assert_array_equal(item["image"], expected.image)
        np.testing.assert_array_equal(item["normal"], expected.normal)
        np.testing.assert_allclose(records.decode_depth_png(item["depth"]), expected.depth, atol=1 / 65535)
        assert item["caption"].decode() == expected.caption and int(item["width"]) == 16
        assert item["aesthetic"] == records.MISSING_SCORE
    assert len(records.RecordReader(tmp_path / "toy_rgbd" / "1.0.0")) == 5


def test_tfds_builder_prepares_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds

    from jointnet_jax.data import tfds_builder

    builder = tfds_builder.SyntheticRgbd(data_dir=tmp_path, config="tiny", file_format="array_record")
    builder.download_and_prepare()
    source = tfds.data_source("synthetic_rgbd/tiny", data_dir=tmp_path, decoders={"depth": tfds.decode.SkipDecoding()})
    assert (len(source["train"]), len(source["validation"])) == (8, 4)
    item = source["train"][0]
    assert item["image"].shape == (16, 16, 3) and item["caption"]
