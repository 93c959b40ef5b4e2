"""Affine-invariant depth evaluation, the protocol of the paper's Sec. 5.2.

Inputs: the prediction is a disparity-like map (inverse depth, e.g. the model's normalised output in
[0, 1], near = bright) known only up to scale and shift; the ground truth is depth (metric, or up to
scale as in MegaDepth), valid where it is finite and > 0 (and where an optional mask is set).

1. Alignment, in disparity space: least-squares ``s, t`` minimising ``sum (s * pred + t - 1 / gt)^2``
   over valid pixels. Like the paper, the fit is repeated on random subsets of the valid pixels and the
   median ``s`` and median ``t`` are kept, which damps outliers in noisy GT; ``num_subsets=0`` fits all
   valid pixels once. Subset count and size are not given in the paper; the defaults below are ours.
2. The aligned disparity is clamped from below at ``min_disparity`` (default: ``1 / max GT depth``, i.e.
   no prediction is farther than the farthest GT point, as in MiDaS's evaluation) and inverted to depth.
3. Metrics over valid pixels: ``absrel = mean(|d_pred - d_gt| / d_gt)`` (depth space), ``rmse_disp`` =
   RMSE of aligned vs GT disparity (units of 1 / GT depth), ``delta1`` = fraction of pixels with
   ``max(d_pred / d_gt, d_gt / d_pred) < 1.25``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jointnet_jax.io_utils import load_image_array, load_npy_map, read_depth

DEFAULT_NUM_SUBSETS = 10
DEFAULT_SUBSET_FRACTION = 0.5
METRIC_NAMES = ("absrel", "rmse_disp", "delta1")
_SUFFIXES = (".png", ".npy")


def _lstsq_affine(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Closed-form least squares for ``y ~ s * x + t`` (the 2x2 normal equations, centred for stability)."""
    xm, ym = x.mean(), y.mean()
    var = np.mean((x - xm) ** 2)
    if not var > 0:
        raise ValueError("prediction is constant over the pixels being fitted; scale is undetermined")
    s = np.mean((x - xm) * (y - ym)) / var
    return float(s), float(ym - s * xm)


def align_disparity(
    pred_disp: np.ndarray,
    gt_disp: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    num_subsets: int = DEFAULT_NUM_SUBSETS,
    subset_fraction: float = DEFAULT_SUBSET_FRACTION,
    seed: int = 0,
) -> tuple[float, float]:
    """Scale and shift taking ``pred_disp`` onto ``gt_disp`` over ``mask`` (all pixels when None).

    With ``num_subsets > 0``: fit on that many random subsets (each ``subset_fraction`` of the masked
    pixels, without replacement, from ``numpy.random.default_rng(seed)``) and return the median scale and
    the median shift. With ``num_subsets == 0``: one fit on all masked pixels.
    """
    pred = np.asarray(pred_disp, dtype=np.float64)
    gt = np.asarray(gt_disp, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    valid = np.ones(pred.shape, bool) if mask is None else np.asarray(mask, bool)
    if valid.shape != pred.shape:
        raise ValueError(f"mask shape {valid.shape} != prediction shape {pred.shape}")
    x, y = pred[valid], gt[valid]
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


def depth_metrics(
    pred_disp: np.ndarray,
    gt_depth: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    num_subsets: int = DEFAULT_NUM_SUBSETS,
    subset_fraction: float = DEFAULT_SUBSET_FRACTION,
    seed: int = 0,
    min_disparity: float | None = None,
) -> dict[str, float]:
    """AbsRel, disparity RMSE and delta1 of an affine-aligned disparity prediction against GT depth.

    Valid pixels: GT finite and > 0, prediction finite, and ``mask`` (when given) true. Returns
    ``dict(absrel, rmse_disp, delta1, scale, shift)``; see the module docstring for the protocol.
    """
    pred = np.asarray(pred_disp, dtype=np.float64)
    gt = np.asarray(gt_depth, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(gt) & (gt > 0) & np.isfinite(pred)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != pred.shape:
            raise ValueError(f"mask shape {mask.shape} != prediction shape {pred.shape}")
        valid &= mask
    gt_d = gt[valid]
    gt_disp = 1.0 / gt_d
    scale, shift = align_disparity(
        pred[valid], gt_disp, num_subsets=num_subsets, subset_fraction=subset_fraction, seed=seed
    )
    floor = gt_disp.min() if min_disparity is None else min_disparity
    return {**_scores(np.maximum(scale * pred[valid] + shift, floor), gt_d), "scale": scale, "shift": shift}


def _scores(disp: np.ndarray, gt_d: np.ndarray) -> dict[str, float]:
    """The metrics of aligned disparities ``disp`` against GT depths ``gt_d`` (valid pixels only)."""
    d_pred, gt_disp = 1.0 / disp, 1.0 / gt_d
    return {
        "absrel": float(np.mean(np.abs(d_pred - gt_d) / gt_d)),
        "rmse_disp": float(np.sqrt(np.mean((disp - gt_disp) ** 2))),
        "delta1": float(np.mean(np.maximum(d_pred / gt_d, gt_d / d_pred) < 1.25)),
    }


def constant_depth_metrics(gt_depth: np.ndarray) -> dict[str, float]:
    """The reference a depth predictor must beat: one constant for the whole image, at its best
    alignment (the least-squares fit of a constant is the mean GT disparity over the valid pixels)."""
    gt = np.asarray(gt_depth, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        gt_d = gt[np.isfinite(gt) & (gt > 0)]
    if gt_d.size == 0:
        raise ValueError("ground truth has no valid (finite, > 0) pixels")
    return _scores(np.full_like(gt_d, np.mean(1.0 / gt_d)), gt_d)


def read_gt_depth(path) -> np.ndarray:
    """GT depth as float64 HW: ``.npy`` (HW or HW1, any units) or 16-bit PNG (raw integer units).

    Zeros and non-finite values are kept; :func:`depth_metrics` treats them as invalid.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = load_npy_map(path)
    else:
        arr = load_image_array(path)
        if arr.dtype != np.uint16:
            raise ValueError(f"{path}: GT depth PNG must be 16-bit greyscale, got {arr.dtype} {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{path}: GT depth must be numeric, got dtype {arr.dtype}")
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


def _listing(stems: list[str], limit: int = 20) -> str:
    more = f" ... and {len(stems) - limit} more" if len(stems) > limit else ""
    return ", ".join(stems[:limit]) + more


def evaluate_depth_folder(pred_dir, gt_dir, **metric_kwargs) -> dict:
    """Score every prediction in ``pred_dir`` against the GT file with the same stem in ``gt_dir``.

    Predictions: disparity in [0, 1] as 8/16-bit PNG or ``.npy`` (read with ``io_utils.read_depth``), at the
    GT's resolution. GT: see :func:`read_gt_depth`. Every file must have a partner; otherwise a ValueError
    lists the unmatched stems. ``metric_kwargs`` go to :func:`depth_metrics`. Returns ``{"per_image":
    {stem: metrics}, "mean": {metric: mean over images}, "count": n}``.
    """
    preds = _files_by_stem(Path(pred_dir), _SUFFIXES)
    gts = _files_by_stem(Path(gt_dir), _SUFFIXES)
    no_gt, no_pred = sorted(preds.keys() - gts.keys()), sorted(gts.keys() - preds.keys())
    if no_gt or no_pred:
        problems = []
        if no_gt:
            problems.append(f"predictions without GT in {gt_dir}: {_listing(no_gt)}")
        if no_pred:
            problems.append(f"GT without predictions in {pred_dir}: {_listing(no_pred)}")
        raise ValueError("unmatched files; " + "; ".join(problems))
    if not preds:
        raise ValueError(f"no prediction files ({'/'.join(_SUFFIXES)}) in {pred_dir}")
    per_image = {}
    for stem in sorted(preds):
        pred, gt = read_depth(preds[stem]), read_gt_depth(gts[stem])
        if pred.shape != gt.shape:
            raise ValueError(f"{preds[stem]} is {pred.shape} but {gts[stem]} is {gt.shape}; resize predictions first")
        per_image[stem] = depth_metrics(pred, gt, **metric_kwargs)
    mean = {name: float(np.mean([m[name] for m in per_image.values()])) for name in METRIC_NAMES}
    return {"per_image": per_image, "mean": mean, "count": len(per_image)}
