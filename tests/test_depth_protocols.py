"""evaluation.depth's dataset protocols (NYU, KITTI presets: PNG scale, valid range, crops, clipping), depth-space
alignment, the added metrics (delta2/3, RMSE, SILog), per-image averaging, ``--pairs`` and the sampler's
prediction layout; known answers worked out by hand in the comments, files built here like the real ones."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from jointnet_jax import evaluate, io_utils
from jointnet_jax.evaluation import depth as de

NYU = (de.DATASETS["nyu"].min_depth, de.DATASETS["nyu"].max_depth)


def _png16(path, values):
    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(path)


def _folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    return pred, gt


def _run(capsys, *args):
    """``jointnet-evaluate depth ARGS``: (exit status, the JSON result or None, stderr)."""
    out = args[-1]
    code = evaluate.main(["depth", *map(str, args[:-1]), "--out", str(out)])
    err = capsys.readouterr().err
    return code, (json.loads(out.read_text()) if code == 0 else None), err


def _nyu_scene(seed=0):
    """A 640x480 NYU-like GT in millimetres (0.5 to 9 m, smooth, 5 % holes stored as 0) and its exact
    prediction: GT disparity in metres^-1, up to scale and shift."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    metres = 0.5 + 8.5 * (0.5 + 0.5 * np.sin(xx / 50.0) * np.cos(yy / 70.0))
    mm = np.round(metres * 1000).astype(np.uint16)
    mm[rng.random(mm.shape) < 0.05] = 0
    with np.errstate(divide="ignore"):
        pred = np.where(mm > 0, 0.3 * (1000.0 / mm) + 0.2, 0.0)  # disparity of the stored mm, affine
    return mm, pred


def test_nyu_eigen_crop_is_a_mask_and_range_excludes_far_gt(tmp_path, capsys):
    pred_dir, gt_dir = _folders(tmp_path)
    mm, pred = _nyu_scene()
    outside = np.ones(mm.shape, bool)
    outside[45:471, 41:601] = False
    pred[outside] = np.random.default_rng(1).uniform(0, 5, outside.sum())  # wrong only outside the Eigen crop
    mm[200, 300], pred[200, 300] = 12000, 4.0  # 12 m inside the crop: beyond NYU's 10 m, must not count
    _png16(gt_dir / "0000.png", mm)
    np.save(pred_dir / "0000.npy", pred)
    code, result, err = _run(capsys, "--pred", pred_dir, "--gt", gt_dir, "--dataset", "nyu", tmp_path / "a.json")
    assert code == 0, err
    m = result["per_image"]["0000"]
    assert m["absrel"] < 1e-9 and m["rmse"] < 1e-9 and m["delta1"] == 1.0
    assert (m["scale"], m["shift"]) == pytest.approx((1 / 0.3, -0.2 / 0.3))
    in_crop = ~outside & (mm > 0) & (mm < 10000)
    assert m["valid_pixels"] == in_crop.sum()
    assert result["settings"]["crop"] == "eigen" and result["settings"]["valid_range"] == {
        "min_depth": 1e-3,
        "max_depth": 10.0,
    }
    code, result, err = _run(
        capsys, "--pred", pred_dir, "--gt", gt_dir, "--dataset", "nyu", "--crop", "none", tmp_path / "b.json"
    )
    assert code == 0, err
    assert result["per_image"]["0000"]["absrel"] > 0.05  # the same files without the crop: the crop mattered


def test_nyu_hand_computed_absrel_inside_the_crop(tmp_path, capsys):
    # Four valid GT pixels inside the crop: disparity y = [1, 2, 4, 5] / m (1000, 500, 250, 200 mm), predicted
    # x = [0, 1, 2, 3]. mean x = 1.5, mean y = 3, cov = (3 + 0.5 + 0.5 + 3) / 4 = 7/4, var x = 5/4, so
    # s = 7/5, t = 3 - 1.4 * 1.5 = 0.9 and the aligned disparity is a = [0.9, 2.3, 3.7, 5.1] (all above the
    # far limit's 1 / 10 m). AbsRel = mean |y / a - 1|. Wrong predictions outside the crop, and one inside on a
    # 12 m GT pixel (beyond 10 m), do not count.
    pred_dir, gt_dir = _folders(tmp_path)
    mm, pred = np.zeros((480, 640), np.uint16), np.zeros((480, 640))
    places = [(50, 50), (100, 200), (300, 400), (470, 600)]
    for (r, c), depth_mm, x in zip(places, [1000, 500, 250, 200], range(4), strict=True):
        mm[r, c], pred[r, c] = depth_mm, x
    for r, c in [(10, 10), (475, 620), (240, 20)]:  # outside rows 45:471 or cols 41:601
        mm[r, c], pred[r, c] = 3000, 50.0
    mm[200, 300], pred[200, 300] = 12000, 9.0
    _png16(gt_dir / "0000.png", mm)
    np.save(pred_dir / "0000.npy", pred)
    args = ("--pred", pred_dir, "--gt", gt_dir, "--dataset", "nyu", "--num-subsets", "0", tmp_path / "r.json")
    code, result, err = _run(capsys, *args)
    assert code == 0, err
    m = result["per_image"]["0000"]
    y, a = np.array([1.0, 2.0, 4.0, 5.0]), np.array([0.9, 2.3, 3.7, 5.1])
    assert m["valid_pixels"] == 4
    assert (m["scale"], m["shift"]) == pytest.approx((1.4, 0.9))
    assert m["absrel"] == pytest.approx(np.mean(np.abs(y / a - 1)))
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((1 / a - 1 / y) ** 2)))  # metres


def test_nyu_crop_needs_the_full_frame(tmp_path, capsys):
    pred_dir, gt_dir = _folders(tmp_path)
    _png16(gt_dir / "0000.png", np.full((12, 16), 2000))
    np.save(pred_dir / "0000.npy", np.random.default_rng(0).random((12, 16)))
    code, _, err = _run(capsys, "--pred", pred_dir, "--gt", gt_dir, "--dataset", "nyu", tmp_path / "r.json")
    assert code == 1
    assert err.count("\n") == 1 and "0000.png is 16x12" in err and "defined at 640x480" in err
    code, _, err = _run(
        capsys, "--pred", pred_dir, "--gt", gt_dir, "--dataset", "nyu", "--crop", "garg", tmp_path / "r.json"
    )
    assert code == 1 and "nyu has no garg crop" in err


def test_kitti_sparse_gt_garg_crop_and_80m_limit(tmp_path, capsys):
    # 40x100 frame: Garg rows int(0.408 * 40) = 16 : int(0.992 * 40) = 39, cols 3 : 96;
    # Eigen rows int(0.332 * 40) = 13 : int(0.914 * 40) = 36, cols 3 : 96.
    rng = np.random.default_rng(3)
    pred_dir, gt_dir = _folders(tmp_path)
    raw, pred = np.zeros((40, 100), np.uint16), rng.uniform(0, 1, (40, 100))  # holes: any prediction
    good = [(r, c) for r in range(16, 39) for c in range(3, 96) if (r * 7 + c) % 5 == 0]  # sparse LiDAR
    for r, c in good:
        raw[r, c] = round(rng.uniform(2, 70) * 256)
        pred[r, c] = 2.0 * 256 / raw[r, c] + 0.1  # exact affine disparity of the stored depth
    raw[20, 51], pred[20, 51] = round(90 * 256), 5.0  # 90 m, inside the crop: beyond KITTI's 80 m
    raw[14, 50], pred[14, 50] = 10 * 256, 3.0  # inside the Eigen crop only
    raw[5, 50], pred[5, 50] = 10 * 256, 3.0  # above both crops (the sky rows)
    _png16(gt_dir / "0000.png", raw)
    np.save(pred_dir / "0000.npy", pred)
    code, result, err = _run(capsys, "--pred", pred_dir, "--gt", gt_dir, "--dataset", "kitti", tmp_path / "g.json")
    assert code == 0, err
    m = result["per_image"]["0000"]
    assert result["settings"]["crop"] == "garg" and result["settings"]["gt_png_scale"] == 256.0
    assert m["valid_pixels"] == len(good)
    assert m["absrel"] < 1e-9 and m["rmse"] < 1e-6 and m["silog"] < 1e-6 and m["delta1"] == 1.0
    assert (m["scale"], m["shift"]) == pytest.approx((0.5, -0.05))  # GT disparity in 1/m: (x - 0.1) / 2
    args = ("--pred", pred_dir, "--gt", gt_dir, "--dataset", "kitti", "--crop", "eigen", tmp_path / "e.json")
    code, result, err = _run(capsys, *args)
    assert code == 0, err
    assert result["per_image"]["0000"]["absrel"] > 1e-3  # (14, 50) now counts
    assert result["settings"]["crop"] == "eigen"


def test_kitti_range_alone_excludes_the_far_pixel():
    gt = np.array([[10.0, 20.0, 40.0, 90.0, 60.0]])
    pred = 1.0 / gt
    pred[0, 3] = 1.0  # wrong, on the 90 m pixel
    kitti = (de.DATASETS["kitti"].min_depth, de.DATASETS["kitti"].max_depth)
    assert de.depth_metrics(pred, gt, depth_range=kitti, num_subsets=0)["absrel"] == pytest.approx(0, abs=1e-12)
    assert de.depth_metrics(pred, gt, num_subsets=0)["absrel"] > 0.1


def test_clipping_to_the_dataset_range_depth_alignment():
    # Depth-space fit of x = [0, 1, 2, 3] to GT g = [1, 9.5, 9.5, 9.5] m: mean x 1.5, mean g 7.375,
    # cov = (1.5 * 6.375 - 0.5 * 2.125 + 0.5 * 2.125 + 1.5 * 2.125) / 4 = 3.1875, var 1.25 -> s = 2.55,
    # t = 7.375 - 3.825 = 3.55: aligned [3.55, 6.1, 8.65, 11.2], clipped to NYU's 10 m.
    x, g = np.array([[0.0, 1.0, 2.0, 3.0]]), np.array([[1.0, 9.5, 9.5, 9.5]])
    m = de.depth_metrics(x, g, alignment="depth", depth_range=NYU, num_subsets=0)
    assert (m["scale"], m["shift"]) == pytest.approx((2.55, 3.55))
    assert m["absrel"] == pytest.approx((2.55 / 1 + 3.4 / 9.5 + 0.85 / 9.5 + 0.5 / 9.5) / 4)
    # The mirror case g = [0.5, 0.5, 0.5, 9]: s = 2.55, t = 2.625 - 3.825 = -1.2, aligned
    # [-1.2, 1.35, 3.9, 6.45]: the negative depth is clipped up to NYU's 1e-3 m.
    g = np.array([[0.5, 0.5, 0.5, 9.0]])
    m = de.depth_metrics(x, g, alignment="depth", depth_range=NYU, num_subsets=0)
    assert m["absrel"] == pytest.approx((0.499 / 0.5 + 0.85 / 0.5 + 3.4 / 0.5 + 2.55 / 9) / 4)
    m = de.depth_metrics(x, g, alignment="depth", num_subsets=0)  # no preset: Marigold's 1e-6 floor
    assert m["absrel"] == pytest.approx(((0.5 - 1e-6) / 0.5 + 0.85 / 0.5 + 3.4 / 0.5 + 2.55 / 9) / 4)


def test_clipping_to_the_dataset_range_disparity_alignment():
    # Disparity fit of x = [0, 1, 2, 3] to y = [0.15, 0.15, 0.15, 2] / m (GT 6.67, 6.67, 6.67, 0.5 m):
    # mean y 0.6125, cov = (1.5 + 0.5 - 0.5) * 0.4625 / 4 + 1.5 * 1.3875 / 4 = 0.69375, s = 0.555,
    # t = -0.22: aligned disparity [-0.22, 0.335, 0.89, 1.445]. NYU's far limit 10 m clamps the first to
    # 1 / 10; without a preset the far limit is the farthest GT point, 1 / 0.15 m, so that pixel is exact.
    x, y = np.array([[0.0, 1.0, 2.0, 3.0]]), np.array([[0.15, 0.15, 0.15, 2.0]])
    a = np.array([0.1, 0.335, 0.89, 1.445])
    m = de.depth_metrics(x, 1 / y, depth_range=NYU, num_subsets=0)
    assert (m["scale"], m["shift"]) == pytest.approx((0.555, -0.22))
    assert m["absrel"] == pytest.approx(np.mean(np.abs(y[0] / a - 1)))
    a[0] = 0.15
    assert de.depth_metrics(x, 1 / y, num_subsets=0)["absrel"] == pytest.approx(np.mean(np.abs(y[0] / a - 1)))


def test_depth_alignment_on_an_affine_depth_prediction():
    gt = np.random.default_rng(4).uniform(1.0, 10.0, (24, 32))
    pred = (gt - 0.5) / 2.0  # affine depth: gt = 2 * pred + 0.5
    for num_subsets in (0, 7):
        m = de.depth_metrics(pred, gt, alignment="depth", num_subsets=num_subsets)
        assert (m["scale"], m["shift"]) == pytest.approx((2.0, 0.5))
        assert m["absrel"] < 1e-12 and m["rmse"] < 1e-12 and m["silog"] < 1e-9
    assert de.depth_metrics(pred, gt, alignment="disparity")["absrel"] > 0.05  # depth is not affine disparity


def test_hand_computed_delta2_delta3_rmse_silog():
    # Depth-space fit with x in three equal groups whose GT means lie on a line (2, 4, 6): the fit gives
    # exactly the group means, p = [2, 2, 4, 4, 6, 6], against g = [1, 3, 4, 4, 3.2, 8.8].
    x = np.array([[0.0, 0.0, 1.0, 1.0, 2.0, 2.0]])
    g = np.array([[1.0, 3.0, 4.0, 4.0, 3.2, 8.8]])
    p = np.array([2.0, 2.0, 4.0, 4.0, 6.0, 6.0])
    m = de.depth_metrics(x, g, alignment="depth", num_subsets=0)
    assert (m["scale"], m["shift"]) == pytest.approx((2.0, 2.0))
    # ratios max(p/g, g/p) = [2, 1.5, 1, 1, 1.875, 1.4667]: < 1.25: 2; < 1.5625: 4; < 1.953125: 5 of 6.
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((2 / 6, 4 / 6, 5 / 6))
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 1 + 2.8**2 + 2.8**2) / 6))
    assert m["absrel"] == pytest.approx((1 + 1 / 3 + 2.8 / 3.2 + 2.8 / 8.8) / 6)
    assert m["rmse_disp"] == pytest.approx(np.sqrt(np.mean((1 / p - g[0] ** -1) ** 2)))
    d = [math.log(2), math.log(2 / 3), 0.0, 0.0, math.log(6 / 3.2), math.log(6 / 8.8)]
    mean_d, mean_d2 = sum(d) / 6, sum(v * v for v in d) / 6
    assert m["silog"] == pytest.approx(math.sqrt(mean_d2 - mean_d**2) * 100)  # Marigold's silog_rmse
    assert m["silog"] != pytest.approx(math.sqrt(mean_d2) * 100, rel=1e-3)  # not plain log RMSE


def test_mean_is_over_images_not_pixels(tmp_path):
    # Image a: 4 pixels, the hand case of test_depth_metrics (AbsRel (1/3 + 1/5 + 1/7 + 1/9) / 4);
    # image b: 100 pixels, exact (AbsRel 0). Mean over images: half of a's; over pixels it would be 4/104.
    pred_dir, gt_dir = _folders(tmp_path)
    np.save(pred_dir / "a.npy", np.array([[0.0, 1.0], [2.0, 3.0]]))
    np.save(gt_dir / "a.npy", 1.0 / np.array([[1.0, 3.0], [4.0, 4.0]]))
    gt_b = np.random.default_rng(5).uniform(1, 5, (10, 10))
    np.save(pred_dir / "b.npy", 1.0 / gt_b)
    np.save(gt_dir / "b.npy", gt_b)
    result = de.evaluate_depth_folder(pred_dir, gt_dir, num_subsets=0)
    absrel_a = (1 / 3 + 1 / 5 + 1 / 7 + 1 / 9) / 4
    assert result["per_image"]["a"]["absrel"] == pytest.approx(absrel_a)
    assert [result["per_image"][k]["valid_pixels"] for k in "ab"] == [4, 100]
    assert result["mean"]["absrel"] == pytest.approx(absrel_a / 2)
    assert result["mean"]["absrel"] != pytest.approx(absrel_a * 4 / 104)
    assert result["mean"]["delta1"] == pytest.approx((0.75 + 1.0) / 2)
    assert "per image" in result["settings"]["averaging"]
    assert set(result["mean"]) == set(de.METRIC_NAMES) >= {"silog", "delta2", "delta3", "rmse", "rmse_disp"}


def test_pairs_file_with_differing_names(tmp_path, capsys):
    rng = np.random.default_rng(6)
    pred_dir, gt_dir = _folders(tmp_path)
    for i in range(2):
        mm = np.round(rng.uniform(800, 6000, (12, 16))).astype(np.uint16)
        mm[0, :4] = 0
        _png16(gt_dir / f"sync_depth_{i:05d}.png", mm)
        with np.errstate(divide="ignore"):
            disp = np.where(mm > 0, 1000.0 / mm, 0.0)
        if i == 0:
            np.save(pred_dir / "rgb_00000.npy", disp.astype(np.float32))
        else:
            io_utils.write_png_depth16(pred_dir / "rgb_00001_depth.png", disp / disp.max())
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        "# NYU test split\n\nrgb_00000.jpg  sync_depth_00000.png  # the photo's name finds rgb_00000.npy\n"
        "rgb_00001_depth.png\tsync_depth_00001.png\n"
    )
    args = ["--pred", pred_dir, "--gt", gt_dir, "--pairs", pairs, "--dataset", "nyu", "--crop", "none"]
    code, result, err = _run(capsys, *args, tmp_path / "r.json")
    assert code == 0, err
    assert sorted(result["per_image"]) == ["rgb_00000.jpg", "rgb_00001_depth.png"]
    assert result["per_image"]["rgb_00000.jpg"]["absrel"] < 1e-6  # float32 .npy
    assert result["per_image"]["rgb_00001_depth.png"]["absrel"] < 1e-3  # 16-bit quantisation
    assert result["settings"]["pairs"] == str(pairs) and result["settings"]["dataset"] == "nyu"

    pairs.write_text(pairs.read_text() + "rgb_00002.jpg sync_depth_00000.png\n")
    code, _, err = _run(capsys, *args, tmp_path / "r2.json")
    assert code == 1 and err.count("\n") == 1
    assert "line 5" in err and "rgb_00002.jpg" in err and "rgb_00002.npy" in err
    pairs.write_text("rgb_00000.npy sync_depth_00009.png\n")
    code, _, err = _run(capsys, *args, tmp_path / "r3.json")
    assert code == 1 and "line 1" in err and "sync_depth_00009.png" in err
    pairs.write_text("rgb_00000.npy\n")
    code, _, err = _run(capsys, *args, tmp_path / "r4.json")
    assert code == 1 and "expected two paths" in err


def test_sample_layout_prefers_npy_and_ignores_previews(tmp_path, capsys):
    # Per photo S: S_depth.png (16-bit), S_depth_color.png (a colour preview that read_depth would refuse),
    # S.npy (float32, full precision), S.json; T has only its 16-bit S_depth.png, U an uncertainty map too.
    rng = np.random.default_rng(7)
    pred_dir, gt_dir = _folders(tmp_path)
    for stem in ("S", "T", "U"):
        gt = rng.uniform(1, 10, (12, 16))
        np.save(gt_dir / f"{stem}.npy", gt)
        disp = (1 / gt - 0.1) / 0.9
        wrong = disp[::-1] if stem == "S" else disp  # S's PNG is wrong: it must lose to S.npy
        io_utils.write_png_depth16(pred_dir / f"{stem}_depth.png", wrong)
        io_utils.write_depth_color(pred_dir / f"{stem}_depth_color.png", wrong)
        (pred_dir / f"{stem}.json").write_text(json.dumps({"prompt": ""}))
    np.save(pred_dir / "S.npy", ((1 / np.load(gt_dir / "S.npy") - 0.1) / 0.9).astype(np.float32))
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(pred_dir / "U_uncertainty.png")
    code, result, err = _run(capsys, "--pred", pred_dir, "--gt", gt_dir, tmp_path / "r.json")
    assert code == 0, err
    assert sorted(result["per_image"]) == ["S", "T", "U"]
    assert result["per_image"]["S"]["absrel"] < 1e-5  # from S.npy (the flipped PNG would be far off)
    assert result["per_image"]["T"]["absrel"] < 1e-3 and result["per_image"]["U"]["absrel"] < 1e-3
    np.save(pred_dir / "V.npy", np.zeros((12, 16), np.float32))
    code, _, err = _run(capsys, "--pred", pred_dir, "--gt", gt_dir, tmp_path / "r.json")
    assert code == 1 and "unmatched files; predictions without GT" in err and "V.npy" in err
    assert "S_depth" not in err and "color" not in err


def test_protocol_and_alignment_names():
    with pytest.raises(ValueError, match="unknown dataset"):
        de.resolve_protocol("scannet")
    assert de.resolve_protocol("kitti")[2] == "garg" and de.resolve_protocol("kitti", "none")[1] is None
    with pytest.raises(ValueError, match="unknown alignment"):
        de.depth_metrics(np.ones((2, 2)), np.ones((2, 2)), alignment="log")


def test_non_finite_prediction_and_empty_gt_name_the_files(tmp_path, capsys):
    pred_dir, gt_dir = _folders(tmp_path)
    pred = np.random.default_rng(8).random((6, 8))
    pred[2, 3] = np.nan
    np.save(pred_dir / "a.npy", pred)
    np.save(gt_dir / "a.npy", np.full((6, 8), 2.0))
    code, _, err = _run(capsys, "--pred", pred_dir, "--gt", gt_dir, tmp_path / "r.json")
    assert code == 1 and "a.npy: the prediction has non-finite values" in err
    np.save(pred_dir / "a.npy", np.nan_to_num(pred))
    np.save(gt_dir / "a.npy", np.full((6, 8), 20.0))  # all beyond NYU's 10 m
    code, _, err = _run(
        capsys, "--pred", pred_dir, "--gt", gt_dir, "--dataset", "nyu", "--crop", "none", tmp_path / "r.json"
    )
    assert code == 1 and err.count("\n") == 1 and "against" in err and "at least 2 valid pixels" in err
