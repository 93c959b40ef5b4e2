"""Image metrics (FID / IS / CLIP score), the evaluate CLI and LPIPS, on tiny random networks.

These check plumbing (inputs reach the library metrics, files and errors behave), not metric values: real
scores need the real Inception and CLIP weights, which tests never have.
"""

import json
import math
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from jointnet_jax import evaluate, image_metrics, io_utils
from jointnet_jax.tiny_base import write_tokenizer


class TinyNet(torch.nn.Module):
    """The Inception's contract: uint8 (B, 3, H, W) in, (B, num_features) out."""

    def __init__(self, num_features: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.num_features = num_features
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, num_features)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x.float() / 255.0)).mean((2, 3)))


def _images(n=16, size=8, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)


def _write_pngs(folder, images, suffix=""):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        io_utils.write_png_rgb(folder / f"{i:04d}{suffix}.png", im)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random transformers CLIP folder (model + processor), saved as a downloaded one would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("clip")
    tok = write_tokenizer(folder)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text.update(max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 8}, projection_dim=8)
    ).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, saved where the real weights file would be."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / image_metrics.INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_fid_same_set_is_zero_and_shifted_set_is_not():
    real = _images()
    same = image_metrics.fid(real, real, feature=TinyNet(), batch_size=5)
    shifted = image_metrics.fid(real, 0.5 + 0.5 * real, feature=TinyNet(), batch_size=5)
    assert abs(same) < 1e-6
    assert shifted > 1e-3 and shifted > 1000 * abs(same)


def test_fid_reads_folders_like_arrays(tmp_path):
    """PNGs are the arrays quantised the same way, so the folder and array forms give the same number."""
    real, fake = _images(seed=1), _images(seed=2)
    folder = _write_pngs(tmp_path / "real", real)
    from_arrays = image_metrics.fid(real, fake, feature=TinyNet())
    assert image_metrics.fid(folder, fake, feature=TinyNet(), batch_size=3) == pytest.approx(from_arrays, rel=1e-9)


def test_inception_score_is_finite_and_seeded():
    images = _images()
    mean, std = image_metrics.inception_score(images, feature=TinyNet(10), splits=4, batch_size=6)
    assert math.isfinite(mean) and math.isfinite(std) and mean >= 1.0 and std >= 0.0
    assert image_metrics.inception_score(images, feature=TinyNet(10), splits=4) == (mean, std)


def test_clip_score_in_library_range(clip_dir):
    score = image_metrics.clip_score(_images(4), ["a cat", "a dog", "cat", "dog"], clip_model=clip_dir, batch_size=3)
    assert math.isfinite(score) and 0.0 <= score <= 100.0


def test_image_metric_errors(tmp_path, clip_dir):
    images = _images(4)
    with pytest.raises(ValueError, match="needs local Inception weights"):
        image_metrics.fid(images, images)
    with pytest.raises(FileNotFoundError, match="Inception weights .*missing.pth do not exist"):
        image_metrics.inception_score(images, inception_weights=tmp_path / "missing.pth", splits=2)
    with pytest.raises(FileNotFoundError, match="CLIP model folder .* does not exist"):
        image_metrics.clip_score(images, ["x"] * 4, clip_model=tmp_path / "no_clip")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        image_metrics.clip_score(images, ["x"] * 4, clip_model=tmp_path)
    with pytest.raises(ValueError, match="one prompt per image, got 3 prompts for 4 images"):
        image_metrics.clip_score(images, ["x"] * 3, clip_model=clip_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* in .*empty"):
        image_metrics.fid(tmp_path / "empty", images, feature=TinyNet())
    with pytest.raises(FileNotFoundError, match="image folder .*absent does not exist"):
        image_metrics.fid(tmp_path / "absent", images, feature=TinyNet())
    bad = images.copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        image_metrics.inception_score(bad, feature=TinyNet(), splits=2)
    with pytest.raises(ValueError, match="at least 2 images per set"):
        image_metrics.fid(images[:1], images, feature=TinyNet())
    with pytest.raises(ValueError, match="splits=5 for 4 images"):
        image_metrics.inception_score(images, feature=TinyNet(), splits=5)
    mixed = _write_pngs(tmp_path / "mixed", images)
    io_utils.write_png_rgb(mixed / "9999.png", _images(1, size=6)[0])
    with pytest.raises(ValueError, match="9999.png is \\(6, 6\\) but .*0000.png is \\(8, 8\\); resize"):
        image_metrics.fid(mixed, images, feature=TinyNet(), batch_size=2)


def test_cli_images_end_to_end(tmp_path, inception_file, clip_dir, capsys):
    """FID + IS through the torch-fidelity Inception read from a weights file, CLIP score from a folder, on a
    sample.py-like folder where only ``*_rgb.png`` are images to score."""
    fake = _write_pngs(tmp_path / "samples", _images(4, seed=3), suffix="_rgb")
    io_utils.write_png_depth16(fake / "0000_depth.png", _images(1)[0, ..., 0])
    real = _write_pngs(tmp_path / "real", _images(4, size=10, seed=4))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f"{i:04d}_rgb.png": p for i, p in enumerate(["a cat", "a dog", "cat", "dog"])}))
    out = tmp_path / "out" / "images.json"
    args = ["images", "--fake", str(fake), "--pattern", "*_rgb.png", "--real", str(real)]
    args += ["--inception-weights", str(inception_file), "--fid-features", "64", "--splits", "2"]
    args += ["--clip-model", str(clip_dir), "--prompts", str(prompts), "--batch-size", "3", "--out", str(out)]
    assert evaluate.main(args) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["count"] == {"fake": 4, "real": 4}
    assert math.isfinite(result["fid"]) and result["fid"] >= -1e-6
    assert result["inception_score"]["mean"] >= 1.0 and math.isfinite(result["inception_score"]["std"])
    assert 0.0 <= result["clip_score"] <= 100.0
    assert result["settings"]["pattern"] == "*_rgb.png" and result["settings"]["fid_features"] == 64
    assert "fid=" in capsys.readouterr().out


def test_cli_images_errors(tmp_path, clip_dir, capsys):
    fake = _write_pngs(tmp_path / "fake", _images(3))
    out = tmp_path / "images.json"
    assert evaluate.main(["images", "--fake", str(fake), "--real", str(fake), "--out", str(out)]) == 1
    assert "FID (--real) needs --inception-weights" in capsys.readouterr().err
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"0000.png": "a cat", "0001.png": "a dog", "7777.png": "a cow"}))
    args = ["images", "--fake", str(fake), "--clip-model", str(clip_dir), "--prompts", str(prompts), "--out", str(out)]
    assert evaluate.main(args) == 1
    err = capsys.readouterr().err
    assert "3 prompts" in err and "images without a prompt: ['0002.png']" in err and "'7777.png'" in err
    assert not out.exists()


def test_cli_depth_end_to_end(tmp_path, capsys):
    """Predictions that are GT disparity up to scale and shift score (almost) perfectly; GT as .npy and 16-bit PNG."""
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    for i in range(2):
        gt = rng.uniform(1.0, 10.0, (12, 16))
        gt[0, :3] = 0.0  # no GT here (MegaDepth holes)
        with np.errstate(divide="ignore"):
            disp = np.where(gt > 0, 1.0 / gt, 1.0)
        io_utils.write_png_depth16(pred_dir / f"{i:04d}.png", (disp - 0.1) / 0.9)
        if i == 0:
            np.save(gt_dir / "0000.npy", gt)
        else:
            Image.fromarray(np.round(gt * 1000).astype(np.uint16)).save(gt_dir / "0001.png")  # millimetres
    out = tmp_path / "depth.json"
    args = ["depth", "--pred", str(pred_dir), "--gt", str(gt_dir), "--num-subsets", "3", "--out", str(out)]
    assert evaluate.main(args) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["count"] == 2 and sorted(result["per_image"]) == ["0000", "0001"]
    assert result["mean"]["absrel"] < 1e-3 and result["mean"]["delta1"] == 1.0
    assert result["settings"]["num_subsets"] == 3 and result["settings"]["min_disparity"] is None
    assert "absrel=" in capsys.readouterr().out
    (gt_dir / "0001.png").unlink()
    assert evaluate.main(args) == 1
    assert "predictions without GT" in capsys.readouterr().err


def test_cli_panorama_delegates(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["panorama", "--help"])
    assert e.value.code == 0 and "--lpips-weights" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13")  # lpips calls torchvision's old API
def test_lpips_distance_with_lpips_package(tmp_path):
    import lpips

    from jointnet_jax.evaluate_panorama import lpips_distance

    torch.manual_seed(0)
    path = tmp_path / "alex_full.pth"
    torch.save(lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False).state_dict(), path)
    distance = lpips_distance(path)
    a, b = _images(2, size=64, seed=5)
    assert distance(a, a) == 0.0 and distance(a, b) > 0.0
    with pytest.raises(FileNotFoundError, match="LPIPS weights .* do not exist"):
        lpips_distance(tmp_path / "missing.pth")
