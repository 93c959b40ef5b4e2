"""Monocular depth (and optional normal) labels from DPT models, in the record conventions.

JointNet labels its training images with DPT-Hybrid MiDaS (``Intel/dpt-hybrid-midas``) run at 384x384.
MiDaS predicts *relative inverse depth* (disparity up to an unknown scale and shift, larger = nearer), so
the record's depth (inverse depth in [0, 1], near = 1) is just that prediction, resized to the stored image
and min-max normalised per image. :func:`normalize_relative_inverse_depth` can instead normalise between
robust percentiles (clipping the tails), which keeps a few outlier pixels from squashing the rest.

Normals come from an optional second model with the same DPT architecture whose last head convolution has
3 output channels (:class:`DPTForNormalEstimation`, e.g. Omnidata's DPT-Hybrid normal model converted to
the transformers layout). Its output is read like Omnidata's: per-pixel ``(n + 1) / 2`` in [0, 1], already
in the record's camera frame (x right, y up, z towards the camera); it is clamped, renormalised to unit
length and stored as 8-bit ``(n + 1) / 2 * 255``. A model with another frame must be converted first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import DPTForDepthEstimation, DPTImageProcessor

NORMAL_CHANNELS = 3


class DPTForNormalEstimation(DPTForDepthEstimation):
    """``DPTForDepthEstimation`` whose head ends in 3 channels, so normal checkpoints load with the same class."""

    def __init__(self, config):
        super().__init__(config)
        last = self.head.head[-2]  # Conv2d(32, 1) before the final ReLU
        self.head.head[-2] = nn.Conv2d(last.in_channels, NORMAL_CHANNELS, kernel_size=1)


def normalize_relative_inverse_depth(prediction: np.ndarray, percentile: float = 0.0) -> np.ndarray:
    """Map a relative inverse depth map (larger = nearer) to float32 [0, 1] with near = 1.

    ``percentile`` p > 0 maps the p-th / (100 - p)-th percentiles to 0 / 1 and clips beyond them; 0 uses the
    min and max. A constant map becomes all zeros (the convention of ``records.normalize_inverse_depth``).
    """
    prediction = np.asarray(prediction, dtype=np.float64)
    if not 0.0 <= percentile < 50.0:
        raise ValueError(f"percentile must be in [0, 50), got {percentile}.")
    if percentile:
        low, high = np.percentile(prediction, [percentile, 100.0 - percentile])
    else:
        low, high = prediction.min(), prediction.max()
    if high - low <= 1e-12 * max(abs(high), 1.0):
        return np.zeros(prediction.shape, np.float32)
    return np.clip((prediction - low) / (high - low), 0.0, 1.0).astype(np.float32)


def encode_normals(prediction: np.ndarray) -> np.ndarray:
    """3xHxW model output in [0, 1] (``(n + 1) / 2``) -> uint8 HxWx3 unit normals as stored in records."""
    normals = np.clip(np.asarray(prediction, dtype=np.float64), 0.0, 1.0) * 2.0 - 1.0
    normals /= np.maximum(np.linalg.norm(normals, axis=0, keepdims=True), 1e-6)
    return np.round((normals.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)


class DepthEstimator:
    """Batched DPT inference: RGB uint8 images -> (depth in [0, 1], normals or None) at requested sizes.

    Every image is resized to one fixed estimation size (``estimate_size``, else the processor's configured
    ``size``: 384x384 for ``Intel/dpt-hybrid-midas``) ignoring aspect ratio, as MiDaS/the paper do, so any
    mix of image shapes forms one batch. Predictions are resized back bicubically (bilinearly for normals)
    before normalising, so the stored maps are exactly in range.
    """

    def __init__(
        self,
        depth_model: DPTForDepthEstimation,
        depth_processor: DPTImageProcessor,
        normal_model: DPTForNormalEstimation | None = None,
        normal_processor: DPTImageProcessor | None = None,
        *,
        estimate_size: int | None = None,
        percentile: float = 0.0,
        device: str | torch.device | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.depth_model = depth_model.to(self.device).eval()
        self.depth_processor = depth_processor
        self.normal_model = None if normal_model is None else normal_model.to(self.device).eval()
        self.normal_processor = normal_processor
        self.estimate_size = estimate_size
        self.percentile = percentile

    @classmethod
    def from_pretrained(cls, depth_model: str, normal_model: str | None = None, **kwargs) -> DepthEstimator:
        """Load from local directories or hub ids (the processor is read from the same place as its model)."""
        normal = None, None
        if normal_model:
            normal = (
                DPTForNormalEstimation.from_pretrained(normal_model),
                DPTImageProcessor.from_pretrained(normal_model),
            )
        depth = DPTForDepthEstimation.from_pretrained(depth_model), DPTImageProcessor.from_pretrained(depth_model)
        return cls(*depth, *normal, **kwargs)

    def _predict(self, model, processor, images: Sequence[np.ndarray]) -> torch.Tensor:
        if self.estimate_size:
            size = {"height": self.estimate_size, "width": self.estimate_size}
        else:
            size = {"height": processor.size["height"], "width": processor.size["width"]}
        inputs = processor(images=list(images), size=size, keep_aspect_ratio=False, return_tensors="pt")
        with torch.inference_mode():
            return model(pixel_values=inputs["pixel_values"].to(self.device)).predicted_depth.float()

    def __call__(
        self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Label a batch of uint8 HxWx3 images; ``sizes`` are the (height, width) of the outputs (default: inputs)."""
        if not images:
            return []
        sizes = [image.shape[:2] for image in images] if sizes is None else sizes
        depth = self._predict(self.depth_model, self.depth_processor, images)
        normal = None
        if self.normal_model is not None:
            normal = self._predict(self.normal_model, self.normal_processor, images)
        labels = []
        for index, size in enumerate(sizes):
            resized = nn.functional.interpolate(depth[index][None, None], size=tuple(size), mode="bicubic")
            label = normalize_relative_inverse_depth(resized[0, 0].cpu().numpy(), self.percentile)
            if normal is not None:
                resized = nn.functional.interpolate(normal[index][None], size=tuple(size), mode="bilinear")
                labels.append((label, encode_normals(resized[0].cpu().numpy())))
            else:
                labels.append((label, None))
        return labels


def tiny_hybrid_config(image_size: int = 64):
    """DPT-Hybrid layout (BiT backbone, 4 reassemble stages, 2 of them from the backbone) at toy sizes,
    for tests and benchmarks that must run without the hub (random weights). ``image_size``: the model input
    side, a multiple of 16 (the BiT stem downsamples 16x)."""
    import transformers

    TINY = image_size  # noqa: N806
    bit = transformers.BitConfig(
        embedding_size=8,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        num_groups=4,
        layer_type="bottleneck",
        global_padding="same",
        embedding_dynamic_padding=True,
        out_features=["stage1", "stage2", "stage3"],
    )
    return transformers.DPTConfig(
        is_hybrid=True,
        backbone_config=bit,
        backbone_featmap_shape=[1, 64, TINY // 16, TINY // 16],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=TINY,
        patch_size=16,
        backbone_out_indices=[0, 0, 0, 1],  # hybrid: entries [2:] pick the transformer layers
        neck_hidden_sizes=[16, 32, 32, 32],
        reassemble_factors=[1, 1, 1, 0.5],
        fusion_hidden_size=16,
    )
