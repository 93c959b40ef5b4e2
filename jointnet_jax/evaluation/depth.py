"""Affine-invariant depth evaluation: the paper's protocol (Sec. 5.2) and the standard dataset protocols of
NYUv2 and KITTI as Marigold and Depth Anything evaluate them, so numbers are comparable with theirs.

Inputs: the prediction is known only up to scale and shift. With ``alignment="disparity"`` (the paper's
protocol, the default) it is a disparity-like map, i.e. inverse depth, such as JointNet's normalised output
in [0, 1] (near = bright). With ``alignment="depth"`` it is affine-invariant *depth* (far = large), as
Marigold predicts. The ground truth is depth: metric (NYU, KITTI) or up to scale (MegaDepth).

1. Valid pixels: GT finite and strictly inside the dataset's range ``(min_depth, max_depth)`` (as
   Marigold's ``_get_valid_mask``; without a preset ``(0, inf)``, so only holes stored as 0 and non-finite
   values drop out), the prediction finite, and inside the evaluation crop. Crops are masks, never slices,
   so prediction and GT keep their shapes.
2. Alignment, a least-squares ``s, t`` over the valid pixels. ``"disparity"``: minimise
   ``sum (s * pred + t - 1 / gt)^2``, then invert ``s * pred + t`` to depth. ``"depth"``: minimise
   ``sum (s * pred + t - gt)^2`` and use ``s * pred + t`` as depth, with no inversion. Like the paper, the fit
   is repeated on ``num_subsets`` random subsets of the valid pixels and the median ``s`` and median ``t``
   are kept, which damps outliers in noisy GT; ``num_subsets=0`` fits all valid pixels once (Marigold's
   fit). Subset count and size are not given in the paper; the defaults below are ours.
3. Clipping, in depth: the aligned depth is clipped to ``[max(min_depth, 1e-6), far]``. ``far`` is
   ``1 / min_disparity`` when given, else the dataset's ``max_depth``, else (no preset) the farthest valid
   GT point of the image, as in MiDaS's evaluation. In disparity space the aligned disparity is clamped
   from below at ``1 / far`` before the inversion, which also turns a negative disparity into ``far``.
4. Metrics over the valid pixels of one image (``p`` aligned depth, ``g`` GT depth):
   ``absrel = mean(|p - g| / g)``; ``delta_k`` = fraction with ``max(p / g, g / p) < 1.25 ** k``;
   ``rmse = sqrt(mean((p - g)^2))`` in GT units (metres for NYU and KITTI); ``rmse_disp`` the same of
   ``1 / p`` against ``1 / g``; ``silog = sqrt(mean(d^2) - mean(d)^2) * 100`` with ``d = log p - log g``,
   as Marigold's ``silog_rmse`` (``src/util/metric.py``, per image) and the ``silog`` of BTS / ZoeDepth's
   ``compute_errors`` that Depth Anything's metric-depth evaluation uses (not the plain RMSE of ``d``);
   computed as ``100 * std(d)``, the same number without the cancellation.
5. Averaging: every metric is computed per image and then averaged over images with equal weight (as
   Marigold's ``MetricTracker``), so a sparse KITTI frame counts as much as a dense one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jointnet_jax.io_utils import load_image_array, load_npy_map, read_depth

DEFAULT_NUM_SUBSETS = 10
DEFAULT_SUBSET_FRACTION = 0.5
METRIC_NAMES = ("absrel", "delta1", "delta2", "delta3", "rmse", "rmse_disp", "silog")
AVERAGING = "per image: each metric over the valid pixels of one image, then the unweighted mean over images"
NEAREST_DEPTH = 1e-6  # Marigold clips every prediction to at least this before its metrics (log, division)
_SUFFIXES = (".png", ".npy")
# A prediction folder per GT stem S, in order of preference: full-precision S.npy, the sampler's 16-bit
# S_depth.png, the older layout's S.png. Previews and uncertainty maps are never predictions.
_PREDICTION_NAMES = ("{}.npy", "{}_depth.png", "{}.png")
_NEVER_PREDICTIONS = ("_depth_color.png", "_uncertainty.png")


@dataclass(frozen=True)
class Crop:
    """An evaluation crop: rows ``[rows[0], rows[1])`` and columns ``[cols[0], cols[1])``, in pixels of an image
    of ``size = (H, W)``, or with ``size=None`` as fractions of the GT's height and width (truncated to
    integers, as BTS's and Marigold's ``garg_crop`` / ``eigen_crop``)."""

    name: str
    rows: tuple[float, float]
    cols: tuple[float, float]
    size: tuple[int, int] | None = None

    def mask(self, shape: tuple[int, int], path) -> np.ndarray:
        """The crop as a boolean mask of ``shape`` (the GT's); ValueError naming ``path`` for a pixel crop of
        another size, since its rows and columns would then cut the wrong part of the frame."""
        h, w = shape
        if self.size is None:
            rows, cols = [int(f * h) for f in self.rows], [int(f * w) for f in self.cols]
        elif tuple(shape) == self.size:
            rows, cols = [int(r) for r in self.rows], [int(c) for c in self.cols]
        else:
            raise ValueError(
                f"{path} is {w}x{h}, but the {self.name} crop is defined at {self.size[1]}x{self.size[0]}; "
                "give GT at that size or choose --crop none"
            )
        inside = np.zeros(shape, bool)
        inside[rows[0] : rows[1], cols[0] : cols[1]] = True
        return inside


@dataclass(frozen=True)
class DatasetProtocol:
    """How one dataset is evaluated: 16-bit PNG GT is ``value / png_scale`` (``.npy`` GT is read as stored),
    GT is valid strictly inside ``(min_depth, max_depth)``, predictions are clipped to that range, and the
    crops it offers (``default_crop`` unless ``--crop`` says otherwise; "none" = no crop)."""

    png_scale: float
    min_depth: float
    max_depth: float
    crops: dict[str, Crop]
    default_crop: str


_NYU_EIGEN = Crop("NYU Eigen", (45, 471), (41, 601), size=(480, 640))
_KITTI_GARG = Crop("KITTI Garg", (0.40810811, 0.99189189), (0.03594771, 0.96405229))
_KITTI_EIGEN = Crop("KITTI Eigen", (0.3324324, 0.91351351), (0.0359477, 0.96405229))
DATASETS = {
    "nyu": DatasetProtocol(1000.0, 1e-3, 10.0, {"eigen": _NYU_EIGEN}, "eigen"),  # millimetres
    "kitti": DatasetProtocol(256.0, 1e-5, 80.0, {"garg": _KITTI_GARG, "eigen": _KITTI_EIGEN}, "garg"),
    "megadepth": DatasetProtocol(1.0, 0.0, math.inf, {}, "none"),  # depth up to scale: raw values
    "none": DatasetProtocol(1.0, 0.0, math.inf, {}, "none"),
}
CROP_NAMES = ("eigen", "garg", "none")


def resolve_protocol(dataset: str = "none", crop: str | None = None) -> tuple[DatasetProtocol, Crop | None, str]:
    """The dataset's protocol, its crop (``crop`` or the dataset's default; None for "none") and the crop's name."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    protocol = DATASETS[dataset]
    name = crop or protocol.default_crop
    if name != "none" and name not in protocol.crops:
        raise ValueError(f"dataset {dataset} has no {name} crop; choose from {', '.join([*protocol.crops, 'none'])}")
    return protocol, protocol.crops.get(name), name


def _lstsq_affine(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Closed-form least squares for ``y ~ s * x + t`` (the 2x2 normal equations, centred for stability)."""
    xm, ym = x.mean(), y.mean()
    var = np.mean((x - xm) ** 2)
    if not var > 0:
        raise ValueError("prediction is constant over the pixels being fitted; scale is undetermined")
    s = np.mean((x - xm) * (y - ym)) / var
    return float(s), float(ym - s * xm)


def align_affine(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    num_subsets: int = DEFAULT_NUM_SUBSETS,
    subset_fraction: float = DEFAULT_SUBSET_FRACTION,
    seed: int = 0,
) -> tuple[float, float]:
    """Scale and shift taking ``pred`` onto ``target`` (GT disparity or GT depth) over ``mask`` (all pixels
    when None).

    With ``num_subsets > 0``: fit on that many random subsets (each ``subset_fraction`` of the masked
    pixels, without replacement, from ``numpy.random.default_rng(seed)``) and return the median scale and
    the median shift. With ``num_subsets == 0``: one fit on all masked pixels.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {target.shape}")
    valid = np.ones(pred.shape, bool) if mask is None else np.asarray(mask, bool)
    if valid.shape != pred.shape:
        raise ValueError(f"mask shape {valid.shape} != prediction shape {pred.shape}")
    x, y = pred[valid], target[valid]
    if x.size < 2:
        raise ValueError(f"need at least 2 valid pixels to fit scale and shift, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("non-finite values inside the mask")
    if num_subsets < 0 or not 0.0 < subset_fraction <= 1.0:
        raise ValueError(f"need num_subsets >= 0 and 0 < subset_fraction <= 1, got {num_subsets}, {subset_fraction}")
    if num_subsets == 0:
        return _lstsq_affine(x, y)
    rng = np.random.default_rng(seed)
    k = max(2, round(subset_fraction * x.size))
    fits = []
    for _ in range(num_subsets):
        idx = rng.choice(x.size, size=k, replace=False)
        fits.append(_lstsq_affine(x[idx], y[idx]))
    s, t = np.median(np.asarray(fits), axis=0)
    return float(s), float(t)


align_disparity = align_affine  # the paper's name for it: the target is GT disparity there


def _in_disparity(x, gt_d, far, **fit) -> tuple[np.ndarray, float, float]:
    s, t = align_affine(x, 1.0 / gt_d, **fit)
    return 1.0 / np.maximum(s * x + t, 1.0 / far), s, t


def _in_depth(x, gt_d, far, **fit) -> tuple[np.ndarray, float, float]:
    s, t = align_affine(x, gt_d, **fit)
    return s * x + t, s, t


# alignment -> (valid predictions, GT depths, far limit, fit options) -> (aligned depth, scale, shift)
ALIGNMENTS: dict[str, Callable] = {"disparity": _in_disparity, "depth": _in_depth}


def valid_pixels(pred: np.ndarray, gt: np.ndarray, mask=None, depth_range=(0.0, math.inf)) -> np.ndarray:
    """Pixels with a finite prediction and a finite GT strictly inside ``depth_range``, and ``mask`` set."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(gt) & (gt > depth_range[0]) & (gt < depth_range[1]) & np.isfinite(pred)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != pred.shape:
            raise ValueError(f"mask shape {mask.shape} != prediction shape {pred.shape}")
        valid &= mask
    return valid


def depth_metrics(
    pred: np.ndarray,
    gt_depth: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    alignment: str = "disparity",
    depth_range: tuple[float, float] = (0.0, math.inf),
    num_subsets: int = DEFAULT_NUM_SUBSETS,
    subset_fraction: float = DEFAULT_SUBSET_FRACTION,
    seed: int = 0,
    min_disparity: float | None = None,
) -> dict[str, float]:
    """The metrics of ``METRIC_NAMES`` of one affine-aligned prediction against GT depth, with the fitted
    ``scale`` and ``shift`` and the number of ``valid_pixels``.

    ``pred`` is disparity-like for ``alignment="disparity"`` and depth-like for ``"depth"``; ``depth_range``
    is the dataset's open valid range, also the clipping range; ``min_disparity`` sets the far limit
    ``1 / min_disparity``. See the module docstring for the protocol.
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; choose from {', '.join(ALIGNMENTS)}")
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt_depth, dtype=np.float64)
    valid = valid_pixels(pred, gt, mask, depth_range)
    x, gt_d = pred[valid], gt[valid]
    if x.size < 2:
        raise ValueError(f"need at least 2 valid pixels to fit scale and shift, got {x.size}")
    if min_disparity is not None:
        far = 1.0 / min_disparity
    else:
        far = depth_range[1] if math.isfinite(depth_range[1]) else float(gt_d.max())
    fit = dict(num_subsets=num_subsets, subset_fraction=subset_fraction, seed=seed)
    depth, scale, shift = ALIGNMENTS[alignment](x, gt_d, far, **fit)
    depth = np.clip(depth, max(depth_range[0], NEAREST_DEPTH), far)
    return {**_scores(depth, gt_d), "scale": scale, "shift": shift, "valid_pixels": int(x.size)}


def _scores(depth: np.ndarray, gt_d: np.ndarray) -> dict[str, float]:
    """The metrics of aligned, clipped depths ``depth`` against GT depths ``gt_d`` (valid pixels only)."""
    ratio = np.maximum(depth / gt_d, gt_d / depth)
    return {
        "absrel": float(np.mean(np.abs(depth - gt_d) / gt_d)),
        **{f"delta{k}": float(np.mean(ratio < 1.25**k)) for k in (1, 2, 3)},
        "rmse": float(np.sqrt(np.mean((depth - gt_d) ** 2))),
        "rmse_disp": float(np.sqrt(np.mean((1.0 / depth - 1.0 / gt_d) ** 2))),
        "silog": float(100.0 * np.std(np.log(depth) - np.log(gt_d))),
    }


def constant_depth_metrics(gt_depth: np.ndarray) -> dict[str, float]:
    """The reference a depth predictor must beat: one constant for the whole image, at its best
    alignment (the least-squares fit of a constant is the mean GT disparity over the valid pixels)."""
    gt = np.asarray(gt_depth, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        gt_d = gt[np.isfinite(gt) & (gt > 0)]
    if gt_d.size == 0:
        raise ValueError("ground truth has no valid (finite, > 0) pixels")
    return _scores(np.full_like(gt_d, 1.0 / np.mean(1.0 / gt_d)), gt_d)


def read_gt_depth(path, png_scale: float = 1.0) -> np.ndarray:
    """GT depth as float64 HW: ``.npy`` (HW or HW1, read as stored, already in its units) or a 16-bit PNG
    divided by ``png_scale`` (1000 for NYU's millimetres, 256 for KITTI).

    Zeros and non-finite values are kept; :func:`depth_metrics` treats them as invalid.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = load_npy_map(path)
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{path}: GT depth must be numeric, got dtype {arr.dtype}")
        return arr.astype(np.float64)
    arr = load_image_array(path)
    if arr.dtype != np.uint16 or arr.ndim != 2:
        raise ValueError(f"{path}: GT depth PNG must be 16-bit greyscale, got {arr.dtype} {arr.shape}")
    return arr.astype(np.float64) / png_scale


def read_prediction(path) -> np.ndarray:
    """A prediction as float64 HW: a PNG by its bit depth (8/16-bit to [0, 1], ``io_utils.read_depth``), or
    ``.npy`` as stored. Any float ``.npy`` is accepted (its scale and shift are fitted anyway, so raw outputs
    of other models need no normalising), but it must be finite: a NaN would silently drop a pixel."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        return read_depth(path).astype(np.float64)
    arr = load_npy_map(path)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: a prediction array must be floating point, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: the prediction has non-finite values")
    return arr.astype(np.float64)


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in found:
                raise ValueError(f"{folder}: two files share the stem {p.stem!r}: {found[p.stem].name}, {p.name}")
            found[p.stem] = p
    return found


def _prediction_index(folder: Path) -> dict[str, Path]:
    """The files of a prediction folder that may be predictions, by name with a lower-case suffix."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    index = {}
    for p in sorted(folder.iterdir()):
        name = p.stem + p.suffix.lower()
        if p.is_file() and p.suffix.lower() in _SUFFIXES and not name.endswith(_NEVER_PREDICTIONS):
            index[name] = p
    return index


def _prediction_for(stem: str, index: dict[str, Path]) -> Path | None:
    """The preferred prediction for ``stem`` (see ``_PREDICTION_NAMES``), or None."""
    return next((index[n.format(stem)] for n in _PREDICTION_NAMES if n.format(stem) in index), None)


def _stems_served(name: str) -> set[str]:
    """The GT stems a prediction file can stand for: ``S.npy`` / ``S.png`` -> S; ``S_depth.png`` -> S, S_depth."""
    stem = Path(name).stem
    return {stem, stem.removesuffix("_depth")} if name.endswith("_depth.png") else {stem}


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def match_by_stem(pred_dir, gt_dir) -> list[tuple[str, Path, Path]]:
    """``(stem, prediction, GT)`` for every GT file in ``gt_dir``, its prediction found in ``pred_dir`` by
    ``_PREDICTION_NAMES``; a ValueError lists the GT without a prediction and the prediction files that
    serve no GT (a file shadowed by a preferred one, ``S_depth.png`` beside ``S.npy``, is not one)."""
    index = _prediction_index(Path(pred_dir))
    gts = _files_by_stem(Path(gt_dir), _SUFFIXES)
    matched = [(stem, _prediction_for(stem, index), gt) for stem, gt in sorted(gts.items())]
    no_pred = [stem for stem, pred, _ in matched if pred is None]
    no_gt = [name for name in index if not _stems_served(name) & gts.keys()]
    if no_gt or no_pred:
        problems = []
        if no_gt:
            problems.append(f"predictions without GT in {gt_dir}: {_listing(no_gt)}")
        if no_pred:
            problems.append(f"GT without predictions in {pred_dir}: {_listing(no_pred)}")
        raise ValueError("unmatched files; " + "; ".join(problems))
    if not matched:
        raise ValueError(f"no GT files ({'/'.join(_SUFFIXES)}) in {gt_dir}")
    return matched


def _resolve_prediction(pred_dir: Path, entry: str, where: str) -> Path:
    """A pairs file's prediction entry: the file itself when it is a prediction, else (an input photo's
    name, say ``rgb_00000.jpg``) the preferred prediction for its stem in the same folder."""
    path = pred_dir / entry
    if path.is_file() and path.suffix.lower() in _SUFFIXES and not path.name.endswith(_NEVER_PREDICTIONS):
        return path
    folder = path.parent
    index = _prediction_index(folder) if folder.is_dir() else {}
    found = _prediction_for(path.stem, index)
    if found is None:
        names = ", ".join(n.format(path.stem) for n in _PREDICTION_NAMES)
        raise FileNotFoundError(f"{where}: no prediction {path} (nor {names} in {folder})")
    return found


def read_pairs(pairs_file, pred_dir, gt_dir) -> list[tuple[str, Path, Path]]:
    """``(entry, prediction, GT)`` for each ``pred gt`` line of ``pairs_file`` (paths relative to ``pred_dir``
    and ``gt_dir``; blank lines and text after ``#`` ignored); one sentence naming the line for a bad one."""
    path = Path(pairs_file)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    pairs, lines = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"pairs file {path} line {n}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected two paths 'pred gt', got {len(fields)}: {line.strip()!r}")
        if fields[0] in lines:
            raise ValueError(f"{where}: prediction {fields[0]} is already paired on line {lines[fields[0]]}")
        gt = Path(gt_dir) / fields[1]
        if not gt.is_file():
            raise FileNotFoundError(f"{where}: no GT file {gt}")
        pairs.append((fields[0], _resolve_prediction(Path(pred_dir), fields[0], where), gt))
        lines[fields[0]] = n
    if not pairs:
        raise ValueError(f"pairs file {path} lists no pairs")
    return pairs


def score_pair(pred_path: Path, gt_path: Path, protocol: DatasetProtocol, crop: Crop | None, **metric_kwargs):
    """:func:`depth_metrics` of one prediction file against one GT file under ``protocol``; a bad input is one
    ValueError naming the files."""
    pred, gt = read_prediction(pred_path), read_gt_depth(gt_path, protocol.png_scale)
    if pred.shape != gt.shape:
        raise ValueError(f"{pred_path} is {pred.shape} but {gt_path} is {gt.shape}; resize predictions first")
    mask = None if crop is None else crop.mask(gt.shape, gt_path)
    try:
        return depth_metrics(pred, gt, mask, depth_range=(protocol.min_depth, protocol.max_depth), **metric_kwargs)
    except ValueError as e:
        raise ValueError(f"{pred_path} against {gt_path}: {e}") from None


def evaluate_depth_folder(
    pred_dir, gt_dir, *, dataset: str = "none", crop: str | None = None, pairs=None, **metric_kwargs
) -> dict:
    """Score every GT file of ``gt_dir`` against its prediction in ``pred_dir`` under ``dataset``'s protocol.

    Pairing: by stem (:func:`match_by_stem`), or the lines of a ``pairs`` file (:func:`read_pairs`) for
    datasets whose prediction and GT names differ. ``crop`` overrides the dataset's default crop.
    ``metric_kwargs`` go to :func:`depth_metrics` (``alignment``, ``num_subsets``, ...). Returns
    ``{"per_image": {key: metrics}, "mean": {metric: mean over images}, "count": n, "settings": {...}}``.
    """
    protocol, crop_mask, crop_name = resolve_protocol(dataset, crop)
    alignment = metric_kwargs.setdefault("alignment", "disparity")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; choose from {', '.join(ALIGNMENTS)}")
    matched = read_pairs(pairs, pred_dir, gt_dir) if pairs else match_by_stem(pred_dir, gt_dir)
    per_image = {key: score_pair(pred, gt, protocol, crop_mask, **metric_kwargs) for key, pred, gt in matched}
    mean = {name: float(np.mean([m[name] for m in per_image.values()])) for name in METRIC_NAMES}
    settings = {
        "dataset": dataset,
        "crop": crop_name,
        "alignment": alignment,
        "valid_range": {"min_depth": protocol.min_depth, "max_depth": _finite_or_none(protocol.max_depth)},
        "gt_png_scale": protocol.png_scale,
        "averaging": AVERAGING,
    }
    return {"per_image": per_image, "mean": mean, "count": len(per_image), "settings": settings}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # strict JSON has no infinity; None = unbounded
