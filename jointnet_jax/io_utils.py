"""Image, depth and mask files <-> float arrays, with the conventions the pipelines use.

Depth here is what the model produces: a normalised map in [0, 1] (for depth, inverse depth with near =
bright). 16-bit PNGs keep that map at full precision; 8-bit PNGs and colour previews are for looking at.
Every writer goes through :func:`atomic_write`, so an interrupted run never leaves a truncated file under
the final name.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")

# Google's Turbo colormap (Apache-2.0) sampled at 17 evenly spaced points; linear interpolation between them
# is within 7/255 of the full 256-entry table, plenty for a preview, and needs no colormap dependency.
_TURBO_ANCHORS = np.array(
    [
        [0.18995, 0.07176, 0.23217],
        [0.25107, 0.25237, 0.63374],
        [0.27628, 0.42118, 0.89123],
        [0.25862, 0.57958, 0.99876],
        [0.15844, 0.73551, 0.92305],
        [0.09267, 0.86554, 0.76230],
        [0.19659, 0.94901, 0.59466],
        [0.42778, 0.99419, 0.38575],
        [0.64362, 0.98999, 0.23356],
        [0.79524, 0.93025, 0.20386],
        [0.92666, 0.82025, 0.22570],
        [0.99163, 0.68408, 0.20706],
        [0.98590, 0.50479, 0.13367],
        [0.92623, 0.32473, 0.05837],
        [0.82399, 0.19182, 0.01966],
        [0.67535, 0.08980, 0.00449],
        [0.47960, 0.01583, 0.01055],
    ]
)


_UMASK = os.umask(0)  # read once (os.umask can only read by setting it) and restored at once
os.umask(_UMASK)


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place.

    The temporary file lives in the same folder so :func:`os.replace` is a same-filesystem atomic rename. It
    gets the permissions a plain ``open(path, "w")`` would give (``mkstemp`` makes it owner-only).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_text(data) -> str:
    """Strict JSON (non-finite numbers are refused: they are not JSON), indented, keys in their given order."""
    return json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"


def write_json(path, data) -> Path:
    """Write ``data`` as strict JSON to ``path`` (parent folders created), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json_text(data)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def write_npz(path, arrays: dict) -> None:
    """Save named arrays as an uncompressed ``.npz``, atomically."""

    def save(tmp: Path):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, save)


def write_npy(path, array) -> None:
    """Save one array as ``.npy``, atomically."""

    def save(tmp: Path):
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, save)


def image_grid(columns: list[np.ndarray]) -> np.ndarray:
    """Rows of images side by side: ``columns[k]`` is (B, H, W, 3); row ``b`` holds image ``b`` of each."""
    return np.concatenate([np.concatenate(row, axis=1) for row in zip(*columns, strict=True)], axis=0)


def decode_image(source, name=None) -> np.ndarray:
    """Pixels of an image, a path or its encoded bytes, as stored: uint8, uint16 (16-bit PNG/TIFF), int32
    (Pillow's mode "I"), float32 or bool, never rescaled. It is turned upright by its EXIF orientation (a
    phone photo comes out as it is displayed); palette, CMYK and other colour modes become RGB, with a
    palette's transparency dropped. The pixels are decoded here, so a truncated file fails now: ValueError
    naming ``name`` (default: the path).

    This is the one image reader: the sampling inputs, the evaluation and the labelling job all use it, so a
    16-bit image is read by its 16-bit range everywhere rather than clipped to 8 bits.
    """
    name = name or (source if isinstance(source, (str, os.PathLike)) else "image")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            if img.mode in _MODES_16BIT:
                return np.asarray(img).astype(np.uint16)
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):  # to real colours; alpha is never used
                img = img.convert("RGB")
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def list_images(spec) -> list[Path]:
    """The image files ``spec`` names: a file, a folder (its images, not recursive) or a glob pattern; sorted.
    FileNotFoundError when it names nothing (one sentence, naming it)."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {path}")
        return found
    found = sorted(p for p in Path().glob(str(spec)) if p.is_file()) if not path.is_absolute() else None
    if found is None:
        anchor = Path(path.anchor)
        found = sorted(p for p in anchor.glob(str(path.relative_to(anchor))) if p.is_file())
    if not found:
        raise FileNotFoundError(f"no such image file, folder or matching files: {spec}")
    return found


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image file as displayed (after its EXIF orientation), read from its header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return (w, h) if orientation in _SWAPPED_ORIENTATIONS else (h, w)


def load_image_array(path) -> np.ndarray:
    """:func:`decode_image` of a file; FileNotFoundError for a missing one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    return decode_image(path)


def load_npy_map(path) -> np.ndarray:
    """A 2-D ``.npy`` array as stored (HW1 squeezed to HW); FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such array file: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read array {path}: {e}") from e
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected an HW or HW1 array, got shape {arr.shape}")
    return arr


def _unit_range(arr: np.ndarray, path) -> np.ndarray:
    """Integer pixels to float32 in [0, 1] by their bit depth; float pixels checked to already be there."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.int32:  # Pillow mode "I": 16-bit data widened to int32 by some writers
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise ValueError(f"{path}: 32-bit integer image has values outside the 16-bit range")
        return arr.astype(np.float32) / 65535.0
    return _checked_float(arr.astype(np.float32), path)


def _checked_float(arr: np.ndarray, path) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: contains non-finite values")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{path}: values must lie in [0, 1], got [{arr.min():g}, {arr.max():g}]")
    return arr


def _rgb(arr: np.ndarray) -> np.ndarray:
    """Three channels: grey is replicated, alpha is dropped."""
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 2:  # grey + alpha
        return np.repeat(arr[..., :1], 3, axis=-1)
    return arr[..., :3]


def read_image(path) -> np.ndarray:
    """RGB image as float32 HWC in [0, 1] (8-bit / 255, 16-bit / 65535); grey is replicated to three channels,
    alpha is dropped."""
    return _unit_range(_rgb(load_image_array(path)), path)


def decode_rgb8(data: bytes, name) -> np.ndarray:
    """Encoded image bytes -> uint8 HWC RGB, upright; 16-bit images are scaled by their range (65535 -> 255),
    not clipped. ValueError naming ``name`` when the bytes are not a readable image."""
    arr = _rgb(decode_image(data, name))
    if arr.dtype == np.uint8:
        return arr
    return np.round(_unit_range(arr, name) * 255.0).astype(np.uint8)


def read_depth(path) -> np.ndarray:
    """Single-channel map as float32 HW in [0, 1].

    PNG: 8-bit divided by 255, 16-bit by 65535; a colour image is accepted when its channels are equal (how
    8-bit depth is often saved) and refused otherwise. ``.npy``: a float array HW or HW1 that must already be
    finite and in [0, 1].
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = load_npy_map(path)
        if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_):
            raise ValueError(f"{path}: depth array must be floating point in [0, 1], got dtype {arr.dtype}")
        return _unit_range(arr, path)
    arr = load_image_array(path)
    if arr.ndim == 3:
        colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        if (colour != colour[..., :1]).any():
            raise ValueError(
                f"{path}: a depth map must have one channel (or equal RGB channels), but its channels differ; "
                "save it as greyscale (8 or 16 bit) or as .npy"
            )
        arr = arr[..., 0]
    return _unit_range(arr, path)


def read_mask(path) -> np.ndarray:
    """Mask as float32 HW of 0/1: any format :func:`read_depth` takes, binarised at 0.5."""
    return (read_depth(path) > 0.5).astype(np.float32)


def _quantise(x: np.ndarray, levels: int, dtype, name: str) -> np.ndarray:
    """Round ``x * levels`` to integers; values outside [0, 1] are clipped (model outputs overshoot a bit)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values")
    return np.round(np.clip(x, 0.0, 1.0) * levels).astype(dtype)


def _write_png(path, pixels: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def write_png_rgb(path, rgb: np.ndarray) -> None:
    """Save float HWC RGB in [0, 1] as an 8-bit PNG (``round(x * 255)``)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be HxWx3, got shape {rgb.shape}")
    _write_png(path, _quantise(rgb, 255, np.uint8, "rgb"))


def write_png_depth16(path, depth: np.ndarray) -> None:
    """Save float HW in [0, 1] as a 16-bit greyscale PNG (``round(x * 65535)``), the lossless depth format."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be HxW, got shape {depth.shape}")
    _write_png(path, _quantise(depth, 65535, np.dtype("<u2"), "depth"))


def turbo_colormap(x: np.ndarray) -> np.ndarray:
    """Turbo colours (float ..., 3 in [0, 1]) for values in [0, 1]; inputs outside are clipped."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    knots = np.linspace(0.0, 1.0, len(_TURBO_ANCHORS))
    return np.stack([np.interp(x, knots, _TURBO_ANCHORS[:, c]) for c in range(3)], axis=-1)


def write_depth_color(path, depth: np.ndarray, *, vmin: float = 0.0, vmax: float = 1.0) -> None:
    """Save a Turbo-coloured 8-bit preview of an HW map; ``[vmin, vmax]`` spans the colormap.

    With the pipelines' inverse depth in [0, 1] the defaults colour near (bright) red and far blue.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be HxW, got shape {depth.shape}")
    if not vmax > vmin:
        raise ValueError(f"need vmax > vmin, got vmin={vmin}, vmax={vmax}")
    if not np.all(np.isfinite(depth)):
        raise ValueError("depth contains non-finite values")
    _write_png(path, _quantise(turbo_colormap((depth - vmin) / (vmax - vmin)), 255, np.uint8, "colours"))
