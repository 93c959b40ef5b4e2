"""``python -m jointnet_jax.sample TASK ...``: joint RGB+depth generation, image->depth, depth->image,
RGBD inpainting, tile-based panoramas (``panorama``, ``pano-inpaint``), tile-based SDEdit upsampling
(``refine``), and panorama -> mesh.

Outputs per sample ``i`` in ``--out``: ``{i:04d}_rgb.png`` (8-bit), ``{i:04d}_depth.png`` (16-bit) and
``{i:04d}_depth_color.png`` (preview) or ``{i:04d}_normal.png``, ``{i:04d}.npz`` (float32 ``rgb`` and
``depth``/``normal`` in [0, 1]) and ``{i:04d}.json`` (prompt, seed, settings, model paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from jointnet_jax import io_utils, mesh

GEN_TASKS = ("generate", "depth", "image", "inpaint")
PANO_INPAINT_PRESETS = {"rgb2j": "depth", "j2rgb": "image", "custom": "inpaint"}  # official preset -> task
TILED_TASKS = {  # subcommand -> (help, default tiling preset)
    "panorama": ("text -> RGBD panorama, tile-based (2048x512 for SD2.1-base; --wrap for 360°)", "ours"),
    "pano-inpaint": ("tile-based panorama inpainting/outpainting with masks", "ours"),
    "refine": ("tile-based SDEdit upsampling/refinement of an RGBD pair (strength 0.4)", "upsample"),
}


def _common(p: argparse.ArgumentParser):
    p.add_argument(
        "--base",
        required=True,
        help="SD2.1-base-style diffusers folder (vae/ text_encoder/ tokenizer/ scheduler/) or a Hub id "
        "such as stabilityai/stable-diffusion-2-1-base (read from the local Hub cache when offline)",
    )
    p.add_argument(
        "--model", required=True, help="JointNet folder in the official layout (unet/ + jointnet/) or a Hub id"
    )
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--scheduler", choices=("ddim", "dpmpp2m", "euler", "euler_a"), default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--height", type=int, help="default: the input's size, else the model's (512 for SD2.1-base)")
    p.add_argument("--width", type=int)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-noise", help=".npy initial latents (B, h, w, 8) NHWC, RGB channels first, unscaled N(0,1)")
    p.add_argument("--strength", type=float, default=1.0, help="SDEdit start point for image-conditioned tasks")
    p.add_argument("--modality", choices=("depth", "normal"), default="depth")
    p.add_argument("--masked-conditioning", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", required=True)
    p.add_argument("--image", help="RGB input (depth, inpaint)")
    p.add_argument("--depth", help="depth input: 8/16-bit PNG or .npy in [0,1], near = bright (image, inpaint)")
    p.add_argument("--mask", help="RGB mask, white = repaint (inpaint)")
    p.add_argument("--depth-mask", help="depth mask, white = repaint (inpaint)")


def _tiling_args(p: argparse.ArgumentParser, mode: str):
    """Tiling flags; unset ones keep the preset's values (``jointnet_jax.pipelines.tiles``)."""
    from jointnet_jax.pipelines.tiles import MODES

    g = p.add_argument_group("tiling (sizes in latent pixels)")
    g.add_argument("--tiling", choices=MODES, default=mode, help=f"preset (default {mode}); none = non-tiled")
    g.add_argument("--tile", type=int, help="tile side (default: the UNet's sample_size, 64 for SD2.1-base)")
    g.add_argument("--stride", type=int, help="tile stride (ours: tile/2, multidiffusion: tile/8)")
    g.add_argument("--tile-batch", type=int, help="tiles per model call (default 8)")
    g.add_argument("--wrap", action="store_true", default=None, help="circular columns: 360° panorama")
    g.add_argument("--random-offset", action=argparse.BooleanOptionalAction, help="random grid offset per step")
    g.add_argument("--ramp", type=int, help="linear weight decay width at tile borders (0 = constant)")
    g.add_argument("--full-view-fraction", type=float, help="whole canvas as a view for this share of steps")
    g.add_argument("--full-view-weight", type=float, help="the whole-canvas view's weight (default 5)")
    g.add_argument(
        "--full-view-resize",
        action=argparse.BooleanOptionalAction,
        help="full view = the canvas resized to one tile (paper; one tile's compute) instead of the full canvas",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jointnet_jax.sample", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)
    helps = {
        "generate": "text -> RGB + depth",
        "depth": "image -> depth",
        "image": "depth -> image",
        "inpaint": "RGBD editing with separate RGB and depth masks",
    }
    for task in GEN_TASKS:
        _common(sub.add_parser(task, help=helps[task]))
    for task, (help_, mode) in TILED_TASKS.items():
        p = sub.add_parser(task, help=help_)
        _common(p)
        _tiling_args(p, mode)
    sub.choices["pano-inpaint"].add_argument("--preset", choices=PANO_INPAINT_PRESETS, default="rgb2j")
    sub.choices["refine"].add_argument("--preset", choices=("both", "image", "depth"), default="both")
    sub.choices["refine"].add_argument("--scale", type=float, default=2.0, help="output size / input size")
    sub.choices["refine"].set_defaults(strength=0.4)
    mesh.add_arguments(sub.add_parser("mesh", help="RGBD panorama -> GLB/PLY mesh"))
    return parser


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    return prompts


def _read_dense(path, modality):
    return io_utils.read_image(path) if modality == "normal" else io_utils.read_depth(path)


def write_outputs(out_dir: Path, result: dict, prompts: list[str], record: dict, modality: str) -> list[Path]:
    """Write every sample's files (each atomically); returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        stem = out_dir / f"{i:04d}"
        io_utils.write_png_rgb(f"{stem}_rgb.png", result["rgb"][i])
        arrays = {"rgb": result["rgb"][i]}
        if modality == "depth":
            io_utils.write_png_depth16(f"{stem}_depth.png", result["depth"][i])
            io_utils.write_depth_color(f"{stem}_depth_color.png", result["depth"][i])
            arrays["depth"] = result["depth"][i]
        else:
            io_utils.write_png_rgb(f"{stem}_normal.png", result["normal"][i])
            arrays["normal"] = result["normal"][i]

        def save_npz(tmp, arrays=arrays):
            with open(tmp, "wb") as f:
                np.savez(f, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})

        io_utils.atomic_write(f"{stem}.npz", save_npz)
        meta = json.dumps({**record, "prompt": prompt, "index": i}, indent=2, sort_keys=True) + "\n"
        io_utils.atomic_write(f"{stem}.json", lambda tmp, meta=meta: tmp.write_text(meta))
        written.append(stem)
    return written


def run_task(args) -> list[Path]:
    import jax.numpy as jnp

    from jointnet_jax.pipelines import Pipeline, SampleSettings

    prompts = _prompts(args)
    inputs = {}
    if args.image:
        inputs["image"] = io_utils.read_image(args.image)
    if args.depth:
        inputs["depth"] = _read_dense(args.depth, args.modality)
    if args.mask:
        inputs["mask"] = io_utils.read_mask(args.mask)
    if args.depth_mask:
        inputs["depth_mask"] = io_utils.read_mask(args.depth_mask)
    init_noise = None
    if args.init_noise:
        if not Path(args.init_noise).is_file():
            raise FileNotFoundError(f"initial noise file {args.init_noise} does not exist")
        init_noise = np.load(args.init_noise)
    settings = SampleSettings(
        steps=args.steps,
        cfg=args.cfg,
        guidance_rescale=args.guidance_rescale,
        scheduler=args.scheduler,
        eta=args.eta,
        height=args.height,
        width=args.width,
        num_samples=args.num_samples,
        seed=args.seed,
        strength=args.strength,
        negative_prompt=args.negative_prompt,
        masked_conditioning={"auto": None, "on": True, "off": False}[args.masked_conditioning],
    )
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.base, args.model, dtype=dtype, modality=args.modality)
    tiling = _tiling(args, pipe) if args.task in TILED_TASKS else None
    kw = dict(init_noise=init_noise, settings=settings, tiling=tiling)
    if args.task == "panorama":
        result = pipe.panorama(prompts, **kw)
    elif args.task == "refine":
        image, depth = inputs.get("image"), inputs.get("depth")
        result = pipe.refine(prompts, image, depth, preset=args.preset, scale=args.scale, **kw)
    else:
        task = PANO_INPAINT_PRESETS[args.preset] if args.task == "pano-inpaint" else args.task
        result = pipe.run(task, prompts, **inputs, **kw)
    batch_prompts = [p for p in prompts for _ in range(args.num_samples)]
    record = {
        "task": args.task,
        "settings": settings.__dict__,
        "base": _source(args.base),
        "model": _source(args.model),
        "modality": args.modality,
        "dtype": args.dtype,
        "tiling": None if tiling is None else dataclasses.asdict(tiling),
        "inputs": {
            k: str(Path(getattr(args, k)).resolve())
            for k in ("image", "depth", "mask", "depth_mask", "init_noise")
            if getattr(args, k)
        },
    }
    written = write_outputs(Path(args.out), result, batch_prompts, record, args.modality)
    print(f"wrote {len(written)} samples to {args.out} in {time.perf_counter() - start:.1f} s")
    return written


def _source(name: str) -> str:
    """How a model was given, for the record: a local folder's absolute path, or the Hub id as it is."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def _tiling(args, pipe):
    """The run's ``Tiling`` (None for non-tiled): the preset with the flags that were given."""
    names = ("stride", "wrap", "random_offset", "ramp", "full_view_fraction", "full_view_weight", "full_view_resize")
    overrides = {name: getattr(args, name) for name in names} | {"batch": args.tile_batch}
    return pipe.native_tiling(args.tiling, args.tile, **overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.task == "mesh":
            print(f"wrote {mesh.run(args)}")
        else:
            run_task(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
