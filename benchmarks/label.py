"""Labelling throughput (images/s): the depth estimator alone and the whole Beam job on the DirectRunner.

Random-weight models (no download): a tiny DPT-Hybrid for the pipeline overhead, and optionally
(``--hybrid``) a DPT-Hybrid-MiDaS-sized one (BiT-R50 + ViT-B/16, ~122M parameters) at 384x384 for the model
cost on this machine. Prints one JSON line with date, machine and command.

    python benchmarks/label.py [--images 16] [--size 512] [--batch-size 4] [--hybrid]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
import transformers
from PIL import Image

from jointnet_jax.data import label
from jointnet_jax.data.depth_estimator import DepthEstimator, tiny_hybrid_config

TINY = 64


def hybrid_config() -> transformers.DPTConfig:
    """The layout of ``Intel/dpt-hybrid-midas`` (transformers' default hybrid BiT backbone)."""
    return transformers.DPTConfig(
        is_hybrid=True,
        image_size=384,
        neck_hidden_sizes=[256, 512, 768, 768],
        backbone_featmap_shape=[1, 1024, 24, 24],
        reassemble_factors=[1, 1, 1, 0.5],
    )


def save_model(config: transformers.DPTConfig, folder: str) -> str:
    torch.manual_seed(0)
    transformers.DPTForDepthEstimation(config).save_pretrained(folder)
    size = {"height": config.image_size, "width": config.image_size}
    transformers.DPTImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def images(count: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8) for _ in range(count)]


def estimator_rate(model_dir: str, batch: list[np.ndarray], batch_size: int) -> float:
    """Images/s of ``DepthEstimator`` after one warm-up batch (pre/post-processing included)."""
    estimator = DepthEstimator.from_pretrained(model_dir)
    estimator(batch[:batch_size])
    start = time.perf_counter()
    for offset in range(0, len(batch), batch_size):
        estimator(batch[offset : offset + batch_size])
    return len(batch) / (time.perf_counter() - start)


def pipeline_rate(model_dir: str, batch: list[np.ndarray], batch_size: int, workdir: str) -> dict[str, float]:
    """Images/s of the whole job on a folder of JPEGs (decode, filter, label, PNG-encode, write)."""
    folder = os.path.join(workdir, "photos")
    os.makedirs(folder)
    for index, image in enumerate(batch):
        Image.fromarray(image).save(os.path.join(folder, f"{index:04d}.jpg"), quality=90)
    argv = ["--input", folder, "--input-format", "folder", "--out", os.path.join(workdir, "out")]
    argv += ["--depth-model", model_dir, "--batch-size", str(batch_size), "--examples-per-shard", str(len(batch))]
    start = time.perf_counter()
    counts = label.run([*argv, "--runner", "DirectRunner"])
    seconds = time.perf_counter() - start
    return {"images_per_s": counts["written"] / seconds, "seconds": seconds, "written": counts["written"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images for the tiny model runs")
    parser.add_argument("--size", type=int, default=512, help="image height (width is 4/3 of it)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hybrid", action="store_true", help="also time a DPT-Hybrid-sized model at 384x384")
    parser.add_argument("--hybrid-images", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    batch = images(args.images, args.size)
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        tiny = save_model(tiny_hybrid_config(TINY), os.path.join(workdir, "tiny"))
        results["tiny_estimator_images_per_s"] = estimator_rate(tiny, batch, args.batch_size)
        results["tiny_pipeline"] = pipeline_rate(tiny, batch, args.batch_size, workdir)
        if args.hybrid:
            hybrid = save_model(hybrid_config(), os.path.join(workdir, "hybrid"))
            results["hybrid_384_estimator_images_per_s"] = estimator_rate(
                hybrid, batch[: args.hybrid_images], min(args.batch_size, args.hybrid_images)
            )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record = {
        "benchmark": "label",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": device,
        },
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "images": args.images,
        "image_size": [args.size, args.size * 4 // 3],
        "batch_size": args.batch_size,
        "results": results,
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
