"""Depth (or normals) from photos of any size: processing sizes, batches of one size through the one compiled
loop, test-time ensembles, and refinement of another estimator's depth.

A photo is processed at a size the UNet can run: its longest side is scaled to the processing resolution (by
default the model's native size, 512 for SD2.1-base; 0 keeps the photo's own size), then each side is rounded
to the nearest multiple of ``Pipeline.size_multiple``, keeping the aspect ratio as far as that rounding
allows. The photo is resized to it (LANCZOS), the prediction is resized back to the photo's size (bilinear).
A photo already at a processing size is not resampled at all, so a single sample there is exactly the plain
``depth`` task.

Photos that share a processing size run as one batch of ``batch_size`` photos (the last batch padded with
copies of its last photo), so a folder compiles the loop once per distinct size. Every photo of a run uses
the same initial noise, the noise a run of that photo alone would draw from the seed, so a photo's result
does not depend on which photos it was batched with (up to the VAE's posterior sample, drawn per batch).

**Ensembles** (``ensemble=K``, after Marigold): the K samples of one photo run in the same batch, each with
its own noise. Depth is normalised inverse depth known only up to scale and shift, so every sample is first
fitted to the per-pixel median of all K by least squares (scale and shift, in that disparity space), then the
aligned samples are merged by their per-pixel median. The median rather than the mean, because a sample that
went wrong (flat, or with a misplaced object) then moves the result at most to its neighbour's value; the
uncertainty map is the per-pixel median absolute deviation from the merged map (Marigold's choice with the
median), zero where all K samples agree. Normals have no scale or shift to fit: they are merged by the
per-component median, their uncertainty is the per-component deviation averaged over the three components.
K = 1 is the plain sample, neither aligned nor clipped.

**Refinement** (``init_depth``, ``strength``): the dense side starts from a given map (another estimator's
depth, e.g. the labelling job's DPT output) by SDEdit while the image stays known: the ``depth`` task with a
depth input. Strength 0 returns the map through the VAE (encoded and decoded); strength 1 ignores it and is the
plain task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Photo:
    """One input: ``name`` (for messages), its displayed size (H, W), and readers called only when its batch
    runs: ``load`` gives (H, W, 3) float32 in [0, 1]; ``init`` (optional) the initial dense map, HW for depth
    or HW3 for normals, at any size. A reader raises ValueError or FileNotFoundError for a bad file."""

    name: str
    size: tuple[int, int]
    load: Callable[[], np.ndarray]
    init: Callable[[], np.ndarray] | None = None


def from_array(array, name: str, init=None) -> Photo:
    """A ``Photo`` of an in-memory (H, W, 3) image in [0, 1] (and an optional initial map)."""
    a = np.asarray(array, np.float32)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{name} must be an (H, W, 3) image, got shape {a.shape}")
    return Photo(name, a.shape[:2], lambda: a, None if init is None else (lambda: np.asarray(init, np.float32)))


def processing_size(size, resolution: int, multiple: int) -> tuple[int, int]:
    """The (H, W) a photo of ``size`` runs at: longest side scaled to ``resolution`` (0: unscaled), each side
    then rounded to the nearest multiple of ``multiple`` (at least one multiple)."""
    h, w = size
    scale = resolution / max(h, w) if resolution else 1.0
    return tuple(max(multiple, int(np.floor(side * scale / multiple + 0.5)) * multiple) for side in (h, w))


def resize(array, size, resample=Image.BILINEAR) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) float map to ``size`` (H, W) channel by channel in PIL's float mode
    (full precision), clipped to [0, 1]; returned as it is when it already has that size."""
    a = np.asarray(array, np.float32)
    if a.shape[:2] == tuple(size):
        return a
    channels = [a] if a.ndim == 2 else list(np.moveaxis(a, -1, 0))
    out = [np.asarray(Image.fromarray(c).resize(tuple(size[::-1]), resample)) for c in channels]
    return np.clip(out[0] if a.ndim == 2 else np.stack(out, -1), 0, 1)


# ---------------------------------------------------------------------------------------------------
# Ensembles


def fit_affine(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``s, t`` for ``y ~ s * x + t`` over all pixels (float64, centred). A constant ``x`` has no
    scale to fit: it is shifted only (``s = 1``)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    xm, ym = x.mean(), y.mean()
    var = np.mean((x - xm) ** 2)
    if not var > 0:
        return 1.0, float(ym - xm)
    s = np.mean((x - xm) * (y - ym)) / var
    return float(s), float(ym - s * xm)


def ensemble_depth(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K disparity samples (K, H, W) -> (merged map in [0, 1], uncertainty), see the module docstring."""
    samples = np.asarray(samples, np.float64)
    if len(samples) == 1:
        return samples[0].astype(np.float32), np.zeros(samples.shape[1:], np.float32)
    reference = np.median(samples, axis=0)
    aligned = np.stack([s * x + t for x in samples for s, t in [fit_affine(x, reference)]])
    merged = np.median(aligned, axis=0)
    spread = np.median(np.abs(aligned - merged), axis=0)
    return np.clip(merged, 0, 1).astype(np.float32), spread.astype(np.float32)


def ensemble_normals(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K normal maps (K, H, W, 3) in [0, 1] -> (per-component median, mean per-component deviation)."""
    samples = np.asarray(samples, np.float64)
    merged = np.median(samples, axis=0)
    spread = np.median(np.abs(samples - merged), axis=0).mean(axis=-1)
    return merged.astype(np.float32), spread.astype(np.float32)


ENSEMBLES = {"depth": ensemble_depth, "normal": ensemble_normals}


# ---------------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class Request:
    """How to run a set of photos: the prompt every photo gets, the processing resolution (None: the model's
    native size; 0: each photo's own size), samples per photo, photos per batch, and the ``SampleSettings``
    (steps, seed, strength, ...; its ``num_samples``, ``height`` and ``width`` are set here)."""

    settings: object
    prompt: str = ""
    resolution: int | None = None
    ensemble: int = 1
    batch_size: int = 1

    def __post_init__(self):
        for name, low in (("ensemble", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.resolution is not None and (not isinstance(self.resolution, int | np.integer) or self.resolution < 0):
            raise ValueError(
                f"processing_resolution must be an integer >= 0 (0: the input's size), got {self.resolution!r}"
            )


def batches(pipe, photos: list[Photo], request: Request) -> Iterator[tuple[tuple[int, int], int, list[int]]]:
    """(processing size, batch length, photo indices) per batch: photos grouped by processing size in order of
    first appearance; every batch of one size has the same length (the last one is padded when it runs)."""
    resolution = pipe.default_size() if request.resolution is None else request.resolution
    groups: dict[tuple[int, int], list[int]] = {}
    for i, photo in enumerate(photos):
        groups.setdefault(processing_size(photo.size, resolution, pipe.size_multiple), []).append(i)
    for size, members in groups.items():
        length = min(request.batch_size, len(members))
        for start in range(0, len(members), length):
            yield size, length, members[start : start + length]


def predict(pipe, photos: list[Photo], request: Request) -> Iterator[tuple[int, dict | Exception]]:
    """Run every photo; yields ``(index, result)`` as each batch finishes, or ``(index, error)`` for a photo
    whose file could not be read (the others go on). A result holds ``depth`` (H, W) or ``normal`` (H, W, 3) at
    the photo's size, its ``uncertainty`` (H, W; zeros for one sample) and the ``processing_size``."""
    for size, length, members in batches(pipe, photos, request):
        loaded, failed = _load(photos, members, size, pipe.modality)
        yield from failed
        if not loaded:
            continue
        dense = _run_batch(
            pipe, [image for _, image, _ in loaded], [init for *_, init in loaded], size, length, request
        )
        for (i, _, _), samples in zip(loaded, dense, strict=False):
            merged, spread = ENSEMBLES[pipe.modality](samples)
            result = {pipe.modality: resize(merged, photos[i].size), "uncertainty": resize(spread, photos[i].size)}
            yield i, {**result, "processing_size": size}


def _load(photos, members, size, modality):
    """The batch's photos read and resized to ``size``: ([(index, image, init or None)], [(index, error)])."""
    loaded, failed = [], []
    for i in members:
        try:
            image = resize(photos[i].load(), size, Image.LANCZOS)
            init = (
                None if photos[i].init is None else resize(_dense_map(photos[i].init(), modality, photos[i].name), size)
            )
        except (ValueError, FileNotFoundError) as e:
            failed.append((i, e))
            continue
        loaded.append((i, image, init))
    return loaded, failed


def _dense_map(array, modality, name) -> np.ndarray:
    a = np.asarray(array, np.float32)
    if a.ndim != (2 if modality == "depth" else 3) or (modality == "normal" and a.shape[-1] != 3):
        expected = "(H, W)" if modality == "depth" else "(H, W, 3)"
        raise ValueError(f"the initial {modality} map for {name} must be {expected}, got shape {a.shape}")
    return a


def _run_batch(pipe, images, inits, size, length, request: Request) -> list[np.ndarray]:
    """One call of the compiled loop for up to ``length`` photos x ``ensemble`` samples; returns each photo's
    (K, ...) samples. Padding repeats the last photo, so every batch of a size has one shape."""
    k, n = request.ensemble, len(images)
    pad = lambda items: items + [items[-1]] * (length - n)  # noqa: E731
    image = np.repeat(np.stack(pad(images)), k, axis=0)
    given = [x for x in inits if x is not None]
    if given and len(given) != n:
        raise ValueError("give an initial map for every photo of a run, or for none")
    depth = np.repeat(np.stack(pad(inits)), k, axis=0) if given else None
    s = request.settings
    settings = type(s)(**{**s.__dict__, "num_samples": k, "height": size[0], "width": size[1]})
    noise = np.tile(pipe.seed_noise(s.seed, k, *size), (length, 1, 1, 1))
    out = pipe.run(
        "depth",
        [request.prompt] * length,
        image=image,
        depth=depth,
        init_noise=noise,
        settings=settings,
        progress=False,
    )
    dense = out[pipe.modality]
    return [dense[j * k : (j + 1) * k] for j in range(n)]
