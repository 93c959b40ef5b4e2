"""FID, Inception Score and CLIP score of generated images, computed by torchmetrics.

Nothing is downloaded: the feature networks come from local paths.

- FID and IS use torch-fidelity's Inception-v3 (the TF 2015-12-05 graph converted to PyTorch), read from
  ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's v0.2.0 release asset; torch hub caches it
  under ``~/.cache/torch/hub/checkpoints/`` after one online run). Any ``torch.nn.Module`` can replace it as
  ``feature``: it receives uint8 ``(B, 3, H, W)`` batches, as the Inception does, and returns ``(B, d)``.
- CLIP score uses a transformers CLIP folder (model + processor, e.g. a downloaded
  ``openai/clip-vit-large-patch14``, torchmetrics' default).

Images are float arrays ``(N, H, W, 3)`` in [0, 1], a folder of PNG/JPEG files, or a list of such files.
They are quantised to uint8 exactly as ``io_utils.write_png_rgb`` saves them, so an array and its PNGs
give the same numbers. Folders are read one batch at a time, so a 30k-image FID does not need the whole
set in memory; all images of one set must share a size (the Inception resizes to 299x299 itself).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from jointnet_jax.io_utils import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
Images = np.ndarray | str | os.PathLike | Sequence[str | os.PathLike]


def image_files(folder, pattern: str | None = None) -> list[Path]:
    """Image files in ``folder`` sorted by name: those matching the glob ``pattern``, else every PNG/JPEG."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if pattern is None:
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [p for p in folder.glob(pattern) if p.is_file()]
    if not files:
        raise ValueError(f"no images ({pattern or '/'.join(IMAGE_SUFFIXES)}) in {folder}")
    return sorted(files)


def _as_source(images: Images) -> np.ndarray | list[Path]:
    """A validated float array or a list of files: the two forms :func:`_batches` reads."""
    if isinstance(images, str | os.PathLike):
        return image_files(images)
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be a float array (N, H, W, 3) in [0, 1], got {images.dtype} {images.shape}")
        if not np.all(np.isfinite(images)):
            raise ValueError("images contain NaN or infinite values")
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise ValueError(f"images must lie in [0, 1], got [{images.min():g}, {images.max():g}]")
        source = images
    else:
        source = [Path(p) for p in images]
    if len(source) == 0:
        raise ValueError("no images given")
    return source


def _batches(source: np.ndarray | list[Path], batch_size: int, device) -> Iterator[torch.Tensor]:
    """uint8 ``(b, 3, H, W)`` batches: the input torch-fidelity's Inception and CLIP's processor expect."""
    shape = None
    for start in range(0, len(source), batch_size):
        chunk = source[start : start + batch_size]
        if not isinstance(chunk, np.ndarray):
            arrays = [read_image(p) for p in chunk]
            for path, arr in zip(chunk, arrays, strict=True):
                shape = shape or (path, arr.shape)
                if arr.shape != shape[1]:
                    raise ValueError(f"{path} is {arr.shape[:2]} but {shape[0]} is {shape[1][:2]}; resize them first")
            chunk = np.stack(arrays)
        pixels = np.round(chunk * 255.0).astype(np.uint8)
        yield torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)


def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _check_file(path, what: str) -> str:
    if path is None:
        raise ValueError(f"{what} needs local Inception weights ({INCEPTION_WEIGHTS_FILE}) or a custom feature module")
    if not Path(path).is_file():
        raise FileNotFoundError(f"Inception weights {path} do not exist")
    return str(path)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def fid(
    real: Images,
    fake: Images,
    *,
    feature: int | torch.nn.Module = 2048,
    inception_weights=None,
    batch_size: int = 50,
    device=None,
) -> float:
    """Fréchet Inception Distance between two image sets (``torchmetrics.image.fid``).

    ``feature``: the Inception layer width (64, 192, 768 or 2048, the standard) read from
    ``inception_weights``, or a custom module (see the module docstring), which then ignores the weights.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_batch_size(batch_size)
    real, fake = _as_source(real), _as_source(fake)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    if isinstance(feature, torch.nn.Module):
        metric = FrechetInceptionDistance(feature=feature)
    else:
        weights = _check_file(inception_weights, "FID")
        metric = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=weights)
    device = _device(device)
    metric = metric.to(device)
    for batch in _batches(real, batch_size, device):
        metric.update(batch, real=True)
    for batch in _batches(fake, batch_size, device):
        metric.update(batch, real=False)
    return float(metric.compute())


@torch.no_grad()
def inception_score(
    images: Images,
    *,
    feature: torch.nn.Module | None = None,
    inception_weights=None,
    splits: int = 10,
    batch_size: int = 50,
    device=None,
    seed: int = 0,
) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) of one set (``torchmetrics.image.inception``).

    The network is the Inception's unbiased logits from ``inception_weights`` (torchmetrics' own IS takes no
    weights path, so the same torch-fidelity network is built here) or a custom ``feature`` module giving
    class logits. ``seed`` fixes the random assignment of images to splits.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    _check_batch_size(batch_size)
    source = _as_source(images)
    if not 2 <= splits <= len(source):
        raise ValueError(f"IS needs 2 <= splits <= number of images, got splits={splits} for {len(source)} images")
    if feature is None:
        weights = _check_file(inception_weights, "IS")
        feature = NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=weights)
    device = _device(device)
    with warnings.catch_warnings():  # its memory warning: the kept logits are 4 kB per image
        warnings.filterwarnings("ignore", "Metric `InceptionScore` will save all extracted features")
        metric = InceptionScore(feature=feature, splits=splits).to(device)
    for batch in _batches(source, batch_size, device):
        metric.update(batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


class _ClipFeatures(torch.nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors: transformers 5 returns output objects there, which
    torchmetrics (<= 1.9) cannot normalise."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings to truncate captions

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _load_clip(folder):
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a transformers CLIP folder (model + processor)")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    return _ClipFeatures(model), CLIPProcessor.from_pretrained(folder, local_files_only=True)


@torch.no_grad()
def clip_score(images: Images, prompts: Sequence[str], *, clip_model, batch_size: int = 50, device=None) -> float:
    """CLIP score: ``100 * cos(image, prompt)`` embedding similarity averaged over pairs, floored at 0
    (``torchmetrics.multimodal.CLIPScore``).

    ``prompts[i]`` describes image ``i``; ``clip_model`` is a local transformers CLIP folder.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    _check_batch_size(batch_size)
    source = _as_source(images)
    prompts = list(prompts)
    if len(prompts) != len(source):
        raise ValueError(f"CLIP score needs one prompt per image, got {len(prompts)} prompts for {len(source)} images")
    model, processor = _load_clip(clip_model)
    device = _device(device)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor)).to(device)
    for i, batch in enumerate(_batches(source, batch_size, device)):
        metric.update(batch, prompts[i * batch_size : (i + 1) * batch_size])
    return float(metric.compute())
