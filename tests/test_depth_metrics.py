"""evaluation.depth: known answers for the disparity-space alignment and the AbsRel / RMSE / delta1 metrics."""

import numpy as np
import pytest
from PIL import Image

from jointnet_jax import io_utils
from jointnet_jax.evaluation import depth as depth_metrics_module
from jointnet_jax.evaluation.depth import align_disparity, depth_metrics, evaluate_depth_folder


def _scene(seed=0, shape=(16, 20)):
    gt_depth = np.random.default_rng(seed).uniform(1.0, 10.0, shape)
    pred = (1.0 / gt_depth - 0.05) / 3.0  # exact affine map of GT disparity: gt_disp = 3 * pred + 0.05
    return pred, gt_depth


@pytest.mark.parametrize("num_subsets", [0, 7])
def test_exact_affine_prediction_is_perfect(num_subsets):
    pred, gt_depth = _scene()
    m = depth_metrics(pred, gt_depth, num_subsets=num_subsets)
    assert m["absrel"] == pytest.approx(0.0, abs=1e-6)
    assert m["rmse_disp"] == pytest.approx(0.0, abs=1e-6)
    assert m["delta1"] == 1.0
    assert (m["scale"], m["shift"]) == pytest.approx((3.0, 0.05))


def test_hand_computed_case():
    # pred x = [0, 1, 2, 3], GT disparity y = [1, 3, 4, 4] (GT depth [1, 1/3, 1/4, 1/4]).
    # mean x = 1.5, mean y = 3; cov = ((-1.5)(-2) + (-0.5)(0) + (0.5)(1) + (1.5)(1)) / 4 = 5/4,
    # var x = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 5/4  ->  s = 1, t = 3 - 1 * 1.5 = 1.5.
    # Aligned disparity [1.5, 2.5, 3.5, 4.5] (all >= min GT disparity 1, so nothing is clamped);
    # residuals [0.5, -0.5, -0.5, 0.5] -> RMSE 0.5.
    # Relative depth error |y / aligned - 1| = [1/3, 1/5, 1/7, 1/9]; depth ratios max(.., 1/..) =
    # [1.5, 1.2, 8/7, 9/8] -> 3 of 4 below 1.25.
    pred = np.array([[0.0, 1.0], [2.0, 3.0]])
    gt_depth = 1.0 / np.array([[1.0, 3.0], [4.0, 4.0]])
    m = depth_metrics(pred, gt_depth, num_subsets=0)
    assert (m["scale"], m["shift"]) == pytest.approx((1.0, 1.5))
    assert m["rmse_disp"] == pytest.approx(0.5)
    assert m["absrel"] == pytest.approx((1 / 3 + 1 / 5 + 1 / 7 + 1 / 9) / 4)
    assert m["delta1"] == 0.75


def test_invalid_pixels_are_excluded():
    pred = np.array([[0.0, 1.0, 2.0], [3.0, 50.0, -7.0]])
    gt_depth = 1.0 / np.array([[1.0, 3.0, 4.0], [4.0, 1.0, 1.0]])
    mask = np.array([[1, 1, 1], [1, 0, 1]], bool)
    gt_depth[1, 2] = 0.0  # no GT there (e.g. MegaDepth holes)
    pred_nan, gt_nan = pred.copy(), gt_depth.copy()
    pred_nan[1, 1], gt_nan[1, 1] = np.nan, np.inf  # non-finite instead of masked out
    expected = depth_metrics(np.array([0.0, 1.0, 2.0, 3.0]), 1.0 / np.array([1.0, 3.0, 4.0, 4.0]), num_subsets=0)
    for p, g, msk in ((pred, gt_depth, mask), (pred_nan, gt_nan, None)):
        assert depth_metrics(p, g, msk, num_subsets=0) == pytest.approx(expected)


def test_median_of_subsets_matches_full_fit_without_noise():
    rng = np.random.default_rng(1)
    pred = rng.random(500)
    gt_disp = 2.0 * pred + 0.3
    full = align_disparity(pred, gt_disp, num_subsets=0)
    assert full == pytest.approx((2.0, 0.3))
    assert align_disparity(pred, gt_disp, num_subsets=9, subset_fraction=0.2, seed=3) == pytest.approx(full)


def test_median_of_subsets_resists_outliers():
    rng = np.random.default_rng(2)
    pred = rng.random(2000)
    gt_disp = 2.0 * pred + 0.3 + rng.normal(0, 0.01, pred.shape)
    gt_disp[:20] += 50.0  # a few wild GT values
    s, t = align_disparity(pred, gt_disp, num_subsets=25, subset_fraction=0.005, seed=0)
    assert abs(s - 2.0) < 0.1 and abs(t - 0.3) < 0.1
    assert align_disparity(pred, gt_disp, num_subsets=25, subset_fraction=0.005, seed=0) == (s, t)  # seeded


def test_degenerate_inputs():
    with pytest.raises(ValueError, match="at least 2 valid"):
        depth_metrics(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="constant"):
        depth_metrics(np.ones((2, 2)), np.arange(1.0, 5.0).reshape(2, 2), num_subsets=0)
    with pytest.raises(ValueError, match="shape"):
        depth_metrics(np.ones((2, 2)), np.ones((2, 3)))


def test_evaluate_folder(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    pred, gt_depth = _scene(0)
    io_utils.write_png_depth16(pred_dir / "a.png", pred / pred.max())  # scale is free: normalise to [0, 1]
    np.save(gt_dir / "a.npy", gt_depth)
    gt_raw = np.round(np.random.default_rng(5).uniform(500, 5000, (8, 9))).astype(np.uint16)
    Image.fromarray(gt_raw).save(gt_dir / "b.png")  # 16-bit GT in raw units
    disp = 1.0 / gt_raw
    np.save(pred_dir / "b.npy", (disp - disp.min()) / (disp.max() - disp.min()))
    result = evaluate_depth_folder(pred_dir, gt_dir, num_subsets=5)
    assert result["count"] == 2 and set(result["per_image"]) == {"a", "b"}
    assert result["per_image"]["a"]["absrel"] < 1e-3  # 16-bit quantisation only
    assert result["per_image"]["b"]["absrel"] < 1e-6  # float32 read-back only
    assert result["mean"]["delta1"] == 1.0
    assert result["mean"]["absrel"] == pytest.approx(np.mean([m["absrel"] for m in result["per_image"].values()]))

    np.save(pred_dir / "c.npy", pred)
    np.save(gt_dir / "d.npy", gt_depth)
    with pytest.raises(ValueError, match=r"without GT.*c.*without predictions.*d"):
        evaluate_depth_folder(pred_dir, gt_dir)


def test_constant_depth_baseline():
    # GT depths [1, 1, 0.5, 0.5]: disparities [1, 1, 2, 2], mean 1.5 -> predicted depth 2/3 everywhere.
    gt = np.array([[1.0, 1.0], [0.5, 0.5]])
    m = depth_metrics_module.constant_depth_metrics(gt)
    assert m["absrel"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 3 + 1 / 3) / 4)  # |2/3 - 1| / 1 = |2/3 - 1/2| / (1/2)
    assert m["rmse_disp"] == pytest.approx(0.5)
    assert m["delta1"] == 0.0  # ratios 1.5 and 4/3, both >= 1.25
    with pytest.raises(ValueError, match="no valid"):
        depth_metrics_module.constant_depth_metrics(np.full((2, 2), np.inf))
