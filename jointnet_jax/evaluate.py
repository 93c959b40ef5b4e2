"""``jointnet-evaluate {depth,images,panorama} ...`` (``python -m jointnet_jax.evaluate``): the paper's
evaluation (§5.2, §5.3), over the ``jointnet_jax.evaluation`` package.

Every result is a JSON file (written atomically) and a one-line summary on stdout. Nothing is downloaded;
every network comes from a local path.

**depth** -- affine-invariant depth metrics (AbsRel, delta1-3, RMSE, disparity RMSE, SILog;
``evaluation/depth.py``, whose docstring gives every formula) of predictions against GT depth::

    eval/
      gt/0001.npy ...       GT depth: .npy as stored, or 16-bit PNG (0 = hole) scaled by the --dataset preset
      pred/0001.npy ...     predictions, per GT stem S: S.npy (float), else S_depth.png, else S.png (8/16-bit)

*Predictions.* By default (``--alignment disparity``, the paper's protocol) a prediction is disparity, i.e.
inverse depth, as JointNet writes it: normalised to [0, 1], near = bright. Its scale and shift are fitted to
the GT disparity ``1 / gt`` by least squares and the result inverted to depth. With ``--alignment depth``
(Marigold's protocol) the prediction is affine-invariant depth, far = large: scale and shift are fitted to the
GT depth directly, with no inversion. Both fits take the median over ``--num-subsets`` random subsets (0 = one
fit on all valid pixels). ``jointnet-sample depth`` writes ``S_depth.png``, ``S_depth_color.png``, ``S.npy``
and ``S.json`` per input photo S; point ``--pred`` at that folder: ``S.npy`` is read (full precision), the
preview, ``*_uncertainty.png`` and the JSON are never predictions, and the older ``S.png`` layout still
works. Predictions must have the GT's resolution.

*Presets.* ``--dataset`` (one row of ``evaluation.depth.DATASETS``) sets the 16-bit PNG GT scale, the valid
range (GT outside it is ignored, the aligned prediction is clipped to it) and the default crop, a mask:

    ========== ============ ================ ==========================================================
    dataset    PNG GT       valid depth      crop (``--crop``)
    ========== ============ ================ ==========================================================
    nyu        / 1000 (m)   (1e-3, 10) m     eigen: rows 45:471, cols 41:601 of a 640x480 frame
    kitti      / 256 (m)    (1e-5, 80) m     garg (default) or eigen, as fractions of the frame (BTS)
    megadepth  raw          (0, inf)         none
    none       raw          (0, inf)         none (the default; the far clip is the farthest GT point)
    ========== ============ ================ ==========================================================

*Pairing.* Files pair by stem; for datasets whose names differ, ``--pairs FILE`` lists one ``pred gt``
pair per line, relative to ``--pred`` and ``--gt`` (blank lines and ``#`` comments ignored); a prediction
entry may also name the input photo (``rgb_00000.jpg``), whose prediction is then found by its stem.

*Results.* Metrics are computed per image and averaged over images (each image weighs the same); the JSON
holds ``per_image`` (with scale, shift, valid pixel count), ``mean``, ``count`` and ``settings`` (dataset,
crop, alignment, valid range, averaging and the fit options). NYUv2 (Eigen test split, GT as 16-bit PNG in
millimetres, its RGB named ``rgb_*.jpg`` and its GT ``sync_depth_*.png``)::

    jointnet-sample depth --base SD21 --model JOINTNET --image 'nyu/rgb_*.jpg' --out nyu_pred
    for f in nyu/rgb_*.jpg; do n=$(basename "$f" .jpg); echo "$n.jpg sync_depth_${n#rgb_}.png"; done > pairs.txt
    jointnet-evaluate depth --pred nyu_pred --gt nyu --pairs pairs.txt --dataset nyu --out nyu.json

MegaDepth ships depth as HDF5; convert each once, e.g.
``np.save(f"gt/{stem}.npy", h5py.File(f"{stem}.h5")["depth"][()])``, and evaluate with ``--dataset megadepth``.

**images** -- FID (with ``--real``), IS (with ``--inception-weights``) and CLIP score (with ``--clip-model``)
of a folder of generated images (``evaluation/images.py``). FID and IS read torch-fidelity's
Inception-v3 weights file ``weights-inception-2015-12-05-6726825d.pth`` (download it once from torch-fidelity's
v0.2.0 GitHub release); CLIP score reads a transformers CLIP folder, e.g. one saved with
``hf download openai/clip-vit-large-patch14 --local-dir clip-vit-large-patch14`` on a machine online. ``--prompts``
is a JSON object mapping each generated image's file name to its prompt. For ``sample.py`` output folders
select the RGB images with ``--pattern '*_rgb.png'`` and build the prompts from its per-sample JSON files::

    python -c "import json, pathlib; d = pathlib.Path('samples'); json.dump({f'{p.stem}_rgb.png':
        json.loads(p.read_text())['prompt'] for p in d.glob('[0-9]*.json')}, open('prompts.json', 'w'))"
    jointnet-evaluate images --fake samples --pattern '*_rgb.png' --real coco_val_512 \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth \\
        --clip-model clip-vit-large-patch14 --prompts prompts.json --out images.json

All images of one folder must share a size (resize real images to the generated size first, as usual for
FID). ``--device cuda`` runs the networks on a GPU (the default when torch sees one).

**panorama** -- intra-LPIPS and time per panorama for non-tiled generation, MultiDiffusion and our tiling
(Table 2; ``evaluation/panorama.py``), with the sampling flags of ``jointnet-sample`` (``--dtype``,
``--sampler``, ``--cfg``, ...)::

    jointnet-evaluate panorama --base SD21 --model JOINTNET --prompts-file prompts.txt --samples 20 \\
        --lpips-weights alex_full.pth --dtype bf16 --out table2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jointnet_jax import cli
from jointnet_jax.evaluation import depth as depth_eval
from jointnet_jax.io_utils import write_json


def _depth_parser(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "--pred",
        required=True,
        help="folder of predictions: per GT stem S, S.npy, else S_depth.png, else S.png (disparity, "
        "near = bright; affine depth with --alignment depth)",
    )
    d.add_argument("--gt", required=True, help="folder of GT depth (same stems): .npy or 16-bit PNG; 0 = no GT")
    d.add_argument("--pairs", help="file of 'pred gt' lines (paths relative to --pred and --gt) instead of stems")
    d.add_argument(
        "--dataset",
        choices=tuple(depth_eval.DATASETS),
        default="none",
        help="protocol preset: PNG GT scale, valid range, default crop (none: raw, > 0, no crop)",
    )
    d.add_argument("--crop", choices=depth_eval.CROP_NAMES, help="evaluation crop (default: nyu eigen, kitti garg)")
    d.add_argument(
        "--alignment",
        choices=tuple(depth_eval.ALIGNMENTS),
        default="disparity",
        help="fit scale and shift in disparity space (predictions are disparity; the paper) or in depth space "
        "(predictions are affine depth; Marigold)",
    )
    d.add_argument("--num-subsets", type=cli.COUNT, default=depth_eval.DEFAULT_NUM_SUBSETS, help="0 = one full fit")
    d.add_argument(
        "--subset-fraction", type=cli.number(low=0, high=1, above=True), default=depth_eval.DEFAULT_SUBSET_FRACTION
    )
    d.add_argument("--seed", type=cli.COUNT, default=0)
    d.add_argument(
        "--min-disparity",
        type=cli.number(low=0, above=True),
        help="far limit as a disparity: aligned depth is clipped to <= 1 / this "
        "(default: the dataset's max depth, else the farthest GT point)",
    )


def _images_parser(i: argparse.ArgumentParser) -> None:
    i.add_argument("--fake", required=True, help="folder of generated images")
    i.add_argument("--pattern", help="glob selecting the generated images (default: every PNG/JPEG)")
    i.add_argument("--real", help="folder of reference images; enables FID")
    i.add_argument("--inception-weights", help="torch-fidelity Inception-v3 .pth; enables IS (and FID with --real)")
    i.add_argument("--fid-features", type=int, default=2048, choices=(64, 192, 768, 2048), help="Inception layer")
    i.add_argument("--splits", type=cli.POSITIVE_INT, default=10, help="IS splits")
    i.add_argument("--clip-model", help="local transformers CLIP folder; enables CLIP score (needs --prompts)")
    i.add_argument("--prompts", help="JSON object: generated image file name -> prompt")
    i.add_argument("--batch-size", type=cli.POSITIVE_INT, default=50)
    i.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    i.add_argument("--seed", type=cli.COUNT, default=0, help="IS split assignment")


def _panorama_parser(p: argparse.ArgumentParser) -> None:
    cli.add_model_arguments(p)
    cli.add_prompt_arguments(p, negative=False)
    cli.add_sampler_arguments(p)
    cli.add_size_arguments(p, "the native height and 4x the native width (2048x512 for SD2.1-base)")
    p.add_argument("--samples", type=cli.POSITIVE_INT, default=20, help="seeds per prompt (paper: 16 prompts x 20)")
    p.add_argument("--lpips-weights", help="full lpips state dict; without it only times are measured")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jointnet-evaluate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_, add in (
        ("depth", "AbsRel / delta1-3 / RMSE / SILog of a prediction folder against GT depth", _depth_parser),
        ("images", "FID / IS / CLIP score of a folder of generated images", _images_parser),
        ("panorama", "intra-LPIPS and time per panorama (Table 2)", _panorama_parser),
    ):
        p = sub.add_parser(name, help=help_)
        add(p)
        p.add_argument("--out", required=True, help="JSON results")
    return parser


def run_depth(args) -> dict:
    fit = dict(
        num_subsets=args.num_subsets,
        subset_fraction=args.subset_fraction,
        seed=args.seed,
        min_disparity=args.min_disparity,
    )
    result = depth_eval.evaluate_depth_folder(
        args.pred, args.gt, dataset=args.dataset, crop=args.crop, pairs=args.pairs, alignment=args.alignment, **fit
    )
    where = {"pred": str(args.pred), "gt": str(args.gt), "pairs": args.pairs and str(args.pairs)}
    result["settings"] = {**where, **result["settings"], **fit}
    print(" ".join(f"{k}={v:.4f}" for k, v in result["mean"].items()) + f" over {result['count']} images")
    return result


def _prompts_for(files: list[Path], prompts_file) -> list[str]:
    """Prompts in the order of ``files`` from a JSON object keyed by file name; every file needs one."""
    path = Path(prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"prompts file {path} is not valid JSON: {e}") from e
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"prompts file {path} must be a JSON object mapping image file names to prompt strings")
    names = [f.name for f in files]
    missing, extra = sorted(set(names) - mapping.keys()), sorted(mapping.keys() - set(names))
    if missing or extra:
        raise ValueError(
            f"{len(mapping)} prompts in {path} for {len(names)} images; "
            f"images without a prompt: {missing[:5]}, prompts without an image: {extra[:5]}"
        )
    return [mapping[n] for n in names]


def run_images(args) -> dict:
    try:
        from jointnet_jax.evaluation import images as image_metrics
    except ImportError as e:
        raise ImportError(f"image metrics need torch, torchmetrics and torch-fidelity (the eval extra): {e}") from e

    if args.real and not args.inception_weights:
        raise ValueError("FID (--real) needs --inception-weights")
    if bool(args.clip_model) != bool(args.prompts):
        raise ValueError("CLIP score needs both --clip-model and --prompts")
    if not (args.inception_weights or args.clip_model):
        raise ValueError("nothing to compute: give --inception-weights (IS, FID with --real) and/or --clip-model")
    fake = image_metrics.image_files(args.fake, args.pattern)
    prompts = _prompts_for(fake, args.prompts) if args.prompts else None  # checked before the slow metrics
    common = dict(batch_size=args.batch_size, device=args.device)
    result: dict = {"count": {"fake": len(fake)}}
    if args.real:
        real = image_metrics.image_files(args.real)
        result["count"]["real"] = len(real)
        result["fid"] = image_metrics.fid(
            real, fake, feature=args.fid_features, inception_weights=args.inception_weights, **common
        )
    if args.inception_weights:
        mean, std = image_metrics.inception_score(
            fake, inception_weights=args.inception_weights, splits=args.splits, seed=args.seed, **common
        )
        result["inception_score"] = {"mean": mean, "std": std}
    if args.clip_model:
        result["clip_score"] = image_metrics.clip_score(fake, prompts, clip_model=args.clip_model, **common)
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("command", "out")}
    print(" ".join(f"{k}={v}" for k, v in result.items() if k in ("fid", "inception_score", "clip_score")))
    return result


def run_panorama(args) -> dict:
    from jointnet_jax.evaluation import panorama
    from jointnet_jax.pipelines import Pipeline

    distance = panorama.lpips_distance(args.lpips_weights) if args.lpips_weights else None
    pipe = Pipeline.from_pretrained(args.base, args.model, dtype=cli.jax_dtype(args.dtype))
    settings = dict(steps=args.steps, height=args.height, width=args.width, cfg=args.cfg, sampler=args.sampler)
    settings.update(guidance_rescale=args.guidance_rescale, eta=args.eta)
    results = panorama.evaluate(pipe, cli.read_prompts(args), args.samples, distance, **settings)
    print(panorama.markdown_table(results))
    return {"methods": results, "settings": {**settings, "samples": args.samples, "dtype": args.dtype}}


COMMANDS = {"depth": run_depth, "images": run_images, "panorama": run_panorama}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def command():
        cli.check_output_file(args.out)  # before the slow part: a bad --out is found now, not after it
        write_json(args.out, COMMANDS[args.command](args))

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
