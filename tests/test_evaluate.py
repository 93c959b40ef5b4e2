"""Image metrics (FID / IS / CLIP score), the evaluate CLI and LPIPS, on tiny random networks.

Real scores need the real Inception and CLIP weights, which tests never have, so the values are checked against
references on the same random networks instead: a hand computation, or torchmetrics / transformers / lpips
called directly, and the CLI against the Python API.
"""

import json
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import jointnet_jax as jj
from jointnet_jax import evaluate, io_utils
from jointnet_jax.evaluation import images as image_metrics
from jointnet_jax.evaluation import panorama as evaluate_panorama
from jointnet_jax.models.tiny import write_tokenizer
from tests.test_tiles import SMALL_UNET
from tests.tiny_sd import make_tiny_base


class TinyNet(torch.nn.Module):
    """The Inception's contract: uint8 (B, 3, H, W) in, (B, num_features) out."""

    def __init__(self, num_features: int = 8, gain: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.num_features = num_features
        self.gain = gain  # as IS logits, the random net's outputs are too alike across images without a gain
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, num_features)

    def forward(self, x):
        return self.gain * self.fc(torch.tanh(self.conv(x.float() / 255.0)).mean((2, 3)))


class ConstantLogits(torch.nn.Module):
    """The same class logits for every image: p(y|x) = p(y), so every split's KL is 0 and IS is 1."""

    def forward(self, x):
        return torch.linspace(-3.0, 2.0, 10).expand(len(x), -1)


def _images(n=16, size=8, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)


def _uint8(images) -> torch.Tensor:
    """(N, H, W, 3) floats -> the uint8 (N, 3, H, W) tensor the library feeds the networks, quantised independently."""
    return torch.from_numpy(np.round(np.asarray(images) * 255.0).astype(np.uint8)).permute(0, 3, 1, 2)


def _inception_score_by_hand(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    """IS in float64: torchmetrics' split assignment is ``torch.randperm`` under ``torch.manual_seed(seed)``, then
    ``exp(mean_x KL(p(y|x) || p(y)))`` per consecutive chunk; mean and sample std over the chunks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logits = logits[torch.randperm(len(logits)).numpy()]
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    scores = []
    for chunk in np.array_split(log_p, splits):
        log_marginal = np.log(np.exp(chunk).mean(0, keepdims=True))
        scores.append(np.exp((np.exp(chunk) * (chunk - log_marginal)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores, ddof=1))


def _clip_score_by_hand(folder, images, prompts) -> tuple[float, np.ndarray]:
    """(torchmetrics' CLIP score, the per-pair ``100 cos``) from transformers called directly on the PNG-quantised
    HWC uint8 arrays. torchmetrics (<= 1.9) floors the mean at 0, not each pair."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    pixels = list(np.round(np.asarray(images) * 255.0).astype(np.uint8))
    inputs = processor(text=list(prompts), images=pixels, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)  # CLIPModel.forward gives the projected embeddings as tensors
    cos = 100.0 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).double().numpy()
    return max(float(cos.mean()), 0.0), cos


@pytest.fixture
def cached_inception():
    """Memoise the Inception's forward per (layers, input): the CLI test recomputes its metrics through the Python
    API, and the second pass over the same images and layers then skips the 299x299 CPU forward (most of the time).
    A different image set, layer or batch still computes."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    cache, forward = {}, NoTrainInceptionV3.forward

    def cached(self, x):
        key = (tuple(self.features_list), tuple(x.shape), x.cpu().numpy().tobytes())
        if key not in cache:
            cache[key] = forward(self, x)
        out = cache[key]
        return out.clone() if isinstance(out, torch.Tensor) else tuple(o.clone() for o in out)

    with mock.patch.object(NoTrainInceptionV3, "forward", cached):
        yield cache


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
    # Seed 8: the test images and prompts get cosines of both signs with a positive mean, so the score is neither
    # 0 (as with most seeds' all-negative cosines) nor indifferent to where the floor at 0 is applied.
    torch.manual_seed(8)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 8}, projection_dim=8)
    ).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


# The random Inception's activations shrink to ~1e-8 through its ~100 layers, so its logits are ~1e-8 and equal
# in float32 (IS exactly 1); this gain brings them to O(10), varying by ~0.3 between the test images, while
# staying far from the float32 softmax underflow that makes torchmetrics' IS NaN (gain 1e9 does).
INCEPTION_LOGIT_GAIN = 3e8


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights and a scaled logits layer (INCEPTION_LOGIT_GAIN), saved
    where the real weights file would be."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    state = net.state_dict()
    state["fc.weight"] = state["fc.weight"] * INCEPTION_LOGIT_GAIN
    path = tmp_path_factory.mktemp("inception") / image_metrics.INCEPTION_WEIGHTS_FILE
    torch.save(state, path)
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


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save all extracted features")
def test_inception_score_matches_torchmetrics_and_hand_computation():
    """The library's IS (batched, seeded) equals torchmetrics' InceptionScore called directly on the quantised
    tensor under the same torch seed, and a float64 hand computation with torchmetrics' permutation; the seed
    picks the split assignment; identical logits score 1."""
    from torchmetrics.image.inception import InceptionScore

    images = _images()
    net = TinyNet(10, gain=30.0)
    with torch.no_grad():
        logits = net(_uint8(images)).double().numpy()
    results = {}
    for seed in (0, 1):
        mean, std = image_metrics.inception_score(images, feature=net, splits=4, batch_size=6, seed=seed)
        direct = InceptionScore(feature=net, splits=4)
        direct.update(_uint8(images))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            direct_mean, direct_std = direct.compute()
        assert (mean, std) == pytest.approx((float(direct_mean), float(direct_std)), rel=1e-6)
        assert (mean, std) == pytest.approx(_inception_score_by_hand(logits, 4, seed), rel=1e-6)
        results[seed] = (mean, std)
    assert mean > 1.05 and results[0][1] != pytest.approx(results[1][1], rel=1e-3)  # not a degenerate set
    assert image_metrics.inception_score(images, feature=net, splits=4) == results[0]  # seed 0 is the default
    mean, std = image_metrics.inception_score(images, feature=ConstantLogits(), splits=4, seed=3)
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_clip_score_matches_transformers_and_torchmetrics(clip_dir):
    """The library's batched CLIP score equals 100 cos of the image and text embeddings from transformers'
    CLIPModel + CLIPProcessor called directly (mean floored at 0, as torchmetrics does), and torchmetrics'
    CLIPScore called directly on the same model in one batch."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = _images(4), ["a cat", "a dog", "cat", "dog"]
    score = image_metrics.clip_score(images, prompts, clip_model=clip_dir, batch_size=3)
    expected, per_pair = _clip_score_by_hand(clip_dir, images, prompts)
    assert expected > 1.0 and per_pair.min() < 0.0, f"fixture no longer gives mixed-sign cosines: {per_pair}"
    assert score == pytest.approx(expected, abs=1e-4)
    model = image_metrics._ClipFeatures(CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval())
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    direct = CLIPScore(model_name_or_path=lambda: (model, processor))
    direct.update(_uint8(images), prompts)
    assert score == pytest.approx(float(direct.compute()), abs=1e-4)


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


def test_cli_images_end_to_end(tmp_path, inception_file, clip_dir, cached_inception, capsys):
    """FID + IS through the torch-fidelity Inception read from a weights file, CLIP score from a folder, on a
    sample.py-like folder where only ``*_rgb.png`` are images to score: the JSON's numbers equal the library
    functions called on the same files, weights and settings."""
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
    files = sorted(fake.glob("*_rgb.png"))
    common = dict(inception_weights=inception_file, batch_size=3)
    batches = len(cached_inception)  # FID real + fake, IS fake: 2 batches of <= 3 images each
    assert result["fid"] == image_metrics.fid(real, files, feature=64, **common)
    mean, std = image_metrics.inception_score(files, splits=2, seed=0, **common)
    assert result["inception_score"] == {"mean": mean, "std": std}
    assert mean > 1.005  # not the degenerate 1.0 of equal logits, so the splits and seed matter
    prompt_list = ["a cat", "a dog", "cat", "dog"]
    assert result["clip_score"] == image_metrics.clip_score(files, prompt_list, clip_model=clip_dir, batch_size=3)
    assert result["clip_score"] > 0.0
    assert batches == 6 and len(cached_inception) == 6  # the API saw the CLI's batches and layers, nothing else
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


@pytest.fixture(scope="module")
def panorama_dirs(tmp_path_factory):
    """(tiny SD base, a twin from test_tiles' 2-level UNet saved in the official layout): tile = 8 latent."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("panorama")
    base = make_tiny_base(root / "base")
    torch.manual_seed(0)
    UNet2DConditionModel(**SMALL_UNET).save_pretrained(root / "small_unet")
    jj.JointNet.from_unet(jj.load_unet(root / "small_unet")).save(root / "twin")
    return base, root / "twin"


@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13")  # lpips calls torchvision's old API
def test_cli_panorama_end_to_end(tmp_path, panorama_dirs, capsys):
    """``evaluate panorama`` on a 32x64 px panorama (16x32 latent, two 32 px crops for AlexNet, 1 step, 1 seed):
    every method is timed and scored, and each intra-LPIPS equals the Python API's panorama of that method scored
    by hand. The API calls reuse the pipeline the CLI loaded (recorded, and checked to be the default one from
    these folders), so its compiled loops are reused instead of traced again."""
    base, twin = panorama_dirs
    weights = evaluate_panorama.write_random_lpips_weights(tmp_path / "alex.pth")
    out = tmp_path / "table2.json"
    size = dict(steps=1, height=32, width=64)
    args = ["panorama", "--base", str(base), "--model", str(twin), "--prompt", "a cat", "--samples", "1"]
    args += ["--steps", "1", "--height", "32", "--width", "64", "--lpips-weights", str(weights), "--out", str(out)]
    loads, from_pretrained = [], jj.Pipeline.from_pretrained

    def recording(*a, **k):
        loads.append((a, k, from_pretrained(*a, **k)))
        return loads[-1][2]

    with mock.patch.object(jj.Pipeline, "from_pretrained", recording):
        assert evaluate.main(args) == 0, capsys.readouterr().err
    written = json.loads(out.read_text())
    assert written["settings"] == dict(
        size, samples=1, dtype="fp32", cfg=7.5, sampler="ddim", guidance_rescale=0.0, eta=0.0
    )
    result = written["methods"]
    assert list(result) == list(evaluate_panorama.METHODS)
    for r in result.values():
        assert r["panoramas"] == 1 and r["time_s"] > 0.0
    assert "| ours (resized full view) |" in capsys.readouterr().out
    [(load_args, load_kwargs, pipe)] = loads
    assert load_args == (str(base), str(twin)) and load_kwargs == {"dtype": jnp.float32}
    distance = evaluate_panorama.lpips_distance(weights)
    for method, (mode, overrides) in evaluate_panorama.METHODS.items():
        rgb = pipe.panorama("a cat", tiling=pipe.native_tiling(mode, **overrides), seed=0, progress=False, **size)
        assert result[method]["intra_lpips"] == evaluate_panorama.intra_lpips(rgb["rgb"][0], distance), method
    assert len({r["intra_lpips"] for r in result.values()}) > 1  # the methods differ, so each was run as itself


def test_cli_panorama_errors(tmp_path, capsys):
    missing = tmp_path / "no_alex.pth"
    args = ["panorama", "--base", str(tmp_path), "--model", str(tmp_path), "--prompt", "a cat"]
    assert evaluate.main(args + ["--lpips-weights", str(missing), "--out", str(tmp_path / "t.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and err.startswith("error: ")
    assert not (tmp_path / "t.json").exists()
    # The sampling flags of ``jointnet-sample``, so Table 2 can run in bf16, with another sampler and guidance.
    flags = evaluate.build_parser().parse_args(
        [*args, "--dtype", "bf16", "--sampler", "dpmpp2m", "--cfg", "3", "--out", "x"]
    )
    assert (flags.dtype, flags.sampler, flags.cfg) == ("bf16", "dpmpp2m", 3.0)


@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13")  # lpips calls torchvision's old API
def test_lpips_distance_with_lpips_package(tmp_path):
    import lpips

    from jointnet_jax.evaluation.panorama import lpips_distance

    torch.manual_seed(0)
    path = tmp_path / "alex_full.pth"
    torch.save(lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False).state_dict(), path)
    distance = lpips_distance(path)
    a, b = _images(2, size=64, seed=5)
    assert distance(a, a) == 0.0 and distance(a, b) > 0.0
    # The value: lpips' own [0, 1] -> [-1, 1] scaling (normalize=True) on a model loaded from the same file.
    # Both the raw random state dict and the plumbing one (non-negative heads) that the panorama runs use.
    reference = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False).eval()
    for weights in (path, evaluate_panorama.write_random_lpips_weights(tmp_path / "alex_abs.pth", seed=1)):
        reference.load_state_dict(torch.load(weights))
        with torch.no_grad():
            expected = float(reference(*(torch.from_numpy(x).permute(2, 0, 1)[None] for x in (a, b)), normalize=True))
        assert lpips_distance(weights)(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    with pytest.raises(FileNotFoundError, match="LPIPS weights .* do not exist"):
        lpips_distance(tmp_path / "missing.pth")
