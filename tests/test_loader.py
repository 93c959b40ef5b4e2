"""The Grain data loader on tiny shards: sharding, determinism, resume, alignment, corrupt records, tokens."""

from __future__ import annotations

import json
import string
from pathlib import Path

import jax
import numpy as np
import pytest

from jointnet_jax.data import records, synthetic
from jointnet_jax.data.loader import (
    Loader,
    LoaderConfig,
    TooManyCorruptRecordsError,
    make_global_batch,
)


def _pipeline(paths, process_index=0, process_count=1, **overrides):
    config = dict(paths=str(paths), resolution=16, batch_size=4, worker_count=0) | overrides
    return Loader(config, process_index=process_index, process_count=process_count)


def _take(pipeline, count):
    return [next(pipeline) for _ in range(count)]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """25 synthetic 32x32 examples in 3 shards (25 is odd, so two processes leave one record over)."""
    folder = tmp_path_factory.mktemp("shards")
    records.write_shards((synthetic.make_example(i, 32) for i in range(25)), folder, "syn", num_shards=3)
    return folder


@pytest.fixture(scope="module")
def aligned_shards(tmp_path_factory):
    """Noise images of several shapes whose depth is the red channel and whose normal map is the image."""
    folder = tmp_path_factory.mktemp("aligned")
    rng = np.random.default_rng(0)
    examples = []
    for i, shape in enumerate([(40, 32), (32, 48), (36, 36)] * 4):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        depth = image[..., 0].astype(np.float32) / 255.0
        examples.append(records.Example(key=f"n{i}", caption="noise", image=image, depth=depth, normal=image))
    records.write_shards(examples, folder, "noise", num_shards=2)
    return folder


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A tiny CLIP BPE vocabulary (letters, end-of-word letters, two merges) in the hub's file layout."""
    folder = tmp_path_factory.mktemp("tokenizer")
    letters = list(string.ascii_lowercase)
    merges = ["r e", "re d</w>"]
    tokens = letters + [f"{c}</w>" for c in letters] + ["re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return folder


def test_batch_layout(shards):
    batch = next(_pipeline(shards))
    assert batch["image"].shape == batch["depth"].shape == (4, 16, 16, 3)
    assert batch["image"].dtype == batch["depth"].dtype == np.float32
    for name in ("image", "depth"):
        assert -1.0 <= batch[name].min() and batch[name].max() <= 1.0
    np.testing.assert_array_equal(batch["depth"][..., 0], batch["depth"][..., 2])  # gray replicated
    assert batch["caption"].shape == (4,) and all(batch["caption"])
    assert batch["valid"].all() and batch["index"].dtype == np.int64


def test_processes_partition_each_epoch(shards):
    """Per epoch the two processes get disjoint records covering all but the odd one, reshuffled per epoch."""
    epochs = {0: [], 1: []}
    for index in range(2):
        batches = _take(_pipeline(shards, index, 2), 6)  # 12 records per process per epoch
        for epoch in range(2):
            epochs[epoch].append([key for batch in batches[3 * epoch : 3 * epoch + 3] for key in batch["key"]])
    all_keys = {f"synthetic-0-{i:08d}" for i in range(25)}
    for first, second in epochs.values():
        assert len(set(first)) == len(set(second)) == 12 and not set(first) & set(second)
        assert len(set(first) | set(second)) == 24 and set(first) | set(second) <= all_keys
    assert epochs[0][0] != epochs[1][0]


def test_seeded_determinism(shards):
    _assert_same_batches(_take(_pipeline(shards, seed=3), 4), _take(_pipeline(shards, seed=3), 4))
    other = _take(_pipeline(shards, seed=4), 4)
    assert [list(b["key"]) for b in other] != [list(b["key"]) for b in _take(_pipeline(shards, seed=3), 4)]


def test_resume_from_state(shards):
    pipeline = _pipeline(shards, seed=1)
    _take(pipeline, 2)
    state = json.loads(json.dumps(pipeline.get_state()))
    expected = _take(pipeline, 5)  # crosses the epoch boundary
    restored = _pipeline(shards, seed=1)
    restored.set_state(state)
    _assert_same_batches(_take(restored, 5), expected)


def test_worker_processes_match_in_process_and_resume(shards):
    """worker_count only changes where elements are decoded, not which batches come out; state restores."""
    expected = _take(_pipeline(shards, seed=5), 4)
    pipeline = _pipeline(shards, seed=5, worker_count=2)
    try:
        _assert_same_batches(_take(pipeline, 2), expected[:2])
        state = json.loads(json.dumps(pipeline.get_state()))
        _assert_same_batches(_take(pipeline, 2), expected[2:])
        pipeline.set_state(state)
        _assert_same_batches(_take(pipeline, 2), expected[2:])
    finally:
        pipeline.close()


def test_crop_and_flip_keep_maps_aligned(aligned_shards):
    """Depth (red channel) and normals (the image) follow the image's crop, resize and flip pixel for pixel."""
    flipped = 0
    for modality in ("depth", "normal"):
        pipeline = _pipeline(aligned_shards, modality=modality, crop_scale=(0.3, 1.0), batch_size=12, seed=2)
        batch = next(pipeline)
        image, dense = batch["image"], batch[modality]
        if modality == "depth":
            error = np.abs(dense[..., 0] - image[..., 0])  # float vs uint8 resize; misaligned noise differs ~0.5
            assert error.max() < 4 / 255 and error.mean() < 1 / 255
        else:
            np.testing.assert_array_equal(dense[..., 1:], image[..., 1:])
            same = np.all(np.isclose(dense[..., 0], image[..., 0], atol=1e-6), axis=(1, 2))
            mirrored = np.all(np.isclose(dense[..., 0], -image[..., 0], atol=1e-6), axis=(1, 2))  # flip negates n_x
            assert np.all(same ^ mirrored)
            flipped = mirrored.sum()
    assert 0 < flipped < 12


def test_eval_mode_single_pass_with_padding(aligned_shards, shards):
    """Eval: no augmentation, each record once, both processes pad to the same number of batches."""
    keys, valid = [], 0
    for index in range(2):
        batches = list(_pipeline(shards, index, 2, training=False))
        assert len(batches) == 4  # ceil(ceil(25 / 2) / 4)
        valid += sum(int(b["valid"].sum()) for b in batches)
        keys += [k for b in batches for k, v in zip(b["key"], b["valid"], strict=True) if v]
    assert valid == 25 and len(set(keys)) == 25
    eval_a = list(_pipeline(aligned_shards, training=False))
    _assert_same_batches(eval_a, list(_pipeline(aligned_shards, training=False, seed=9)))


def _with_corrupt(folder, good, bad):
    """Shard with ``good`` valid records and ``bad`` garbage / truncated ones spread between them."""
    valid = [records.encode_example(synthetic.make_example(i, 32)) for i in range(good)]
    garbage = [b"\xffnot a record", valid[0][: len(valid[0]) // 2]] * bad
    items = valid[:]
    for i in range(bad):
        items.insert((i * len(items)) // bad, garbage[i])
    records.write_shards(items, folder, "mixed", num_shards=1)
    return folder


def test_corrupt_records_are_skipped_and_counted(tmp_path):
    folder = _with_corrupt(tmp_path, good=30, bad=2)
    pipeline = _pipeline(folder, batch_size=5, max_corrupt_fraction=0.1, corrupt_check_after=10)
    batches = _take(pipeline, 7)  # 35 good records: more than one full epoch was read
    assert all(b["valid"].all() and all(b["key"]) for b in batches)
    assert pipeline.num_corrupt >= 2 and pipeline.num_seen == 35 + pipeline.num_corrupt
    state = pipeline.get_state()
    restored = _pipeline(folder, batch_size=5, max_corrupt_fraction=0.1, corrupt_check_after=10)
    restored.set_state(state)
    assert (restored.num_seen, restored.num_corrupt) == (pipeline.num_seen, pipeline.num_corrupt)
    evaluated = _pipeline(folder, batch_size=5, training=False, max_corrupt_fraction=0.1)
    rows = np.concatenate([b["valid"] for b in evaluated])
    assert evaluated.num_corrupt == 2 and evaluated.num_seen == 32 and rows.sum() == 30 and rows.size == 35


def test_too_many_corrupt_records_stop(tmp_path):
    pipeline = _pipeline(_with_corrupt(tmp_path, good=10, bad=10), max_corrupt_fraction=0.01, corrupt_check_after=5)
    with pytest.raises(TooManyCorruptRecordsError, match=r"records read so far .* are corrupt, more than"):
        _take(pipeline, 5)


def test_a_block_corrupted_shard_is_counted_and_skipped(tmp_path):
    """2000 bytes overwritten among the records of a shard, across the Riegeli block header at 64 KiB (the
    "block header hash mismatch" of a damaged disk or copy): the damaged records are counted as corrupt and
    skipped, the others are read, and the eval pass says how many were lost."""
    records.write_shards((synthetic.make_example(i, 32) for i in range(40)), tmp_path, "syn", num_shards=1)
    (shard,) = records.list_shards(tmp_path)
    data = bytearray(Path(shard).read_bytes())
    start = (1 << 16) - 1000  # the records fill the first ~90 KiB; the record index sits in the last block
    data[start : start + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    Path(shard).write_bytes(bytes(data))
    evaluated = _pipeline(tmp_path, batch_size=8, training=False, max_corrupt_fraction=0.25, corrupt_check_after=8)
    rows = np.concatenate([b["valid"] for b in evaluated])
    assert 1 <= evaluated.num_corrupt <= 4 and evaluated.num_seen == 40
    assert rows.sum() == 40 - evaluated.num_corrupt
    training = _pipeline(tmp_path, batch_size=8, max_corrupt_fraction=0.25, corrupt_check_after=8)
    assert all(b["valid"].all() for b in _take(training, 6))  # more than an epoch: damaged records skipped
    strict = _pipeline(tmp_path, batch_size=8, training=False, max_corrupt_fraction=0.0, corrupt_check_after=8)
    with pytest.raises(TooManyCorruptRecordsError):
        list(strict)


def test_a_shard_that_cannot_be_opened_is_named(tmp_path):
    records.write_shards((synthetic.make_example(i, 32) for i in range(4)), tmp_path, "syn", num_shards=2)
    first, second = records.list_shards(tmp_path)
    Path(second).write_bytes(Path(second).read_bytes()[:-40])  # the footer (the record index) cut off
    with pytest.raises(records.RecordError, match=rf"^record shard {second} cannot be opened: "):
        records.RecordReader(tmp_path)


def test_tokenized_captions(shards, tokenizer_folder):
    import transformers  # noqa: F401 - a required test dependency

    from jointnet_jax.models.loading import load_tokenizer

    batch = next(_pipeline(shards, tokenizer=str(tokenizer_folder)))
    assert "caption" not in batch and batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == np.int32
    tokenizer = load_tokenizer(tokenizer_folder)
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert np.isin(batch["input_ids"][:, -1], [tokenizer.eos_token_id, tokenizer.pad_token_id]).all()
    _assert_same_batches([batch], [next(_pipeline(shards, tokenizer=tokenizer))])


def test_make_global_batch(shards):
    batch = next(_pipeline(shards))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    arrays = make_global_batch(batch, sharding)
    assert set(arrays) == {"image", "depth", "index", "valid"}
    np.testing.assert_array_equal(np.asarray(arrays["image"]), batch["image"])


def test_config_validation(shards):
    with pytest.raises(ValueError, match="modality"):
        LoaderConfig(paths=str(shards), modality="segmentation")
    with pytest.raises(ValueError, match="crop_scale"):
        LoaderConfig(paths=str(shards), crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="process_index"):
        _pipeline(shards, 2, 2)
