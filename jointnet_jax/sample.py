"""``jointnet-sample COMMAND ...`` (``python -m jointnet_jax.sample``): joint RGB+depth generation,
image->depth, depth->image, RGBD inpainting, tile-based panoramas (``panorama``, ``pano-inpaint``), tile-based
SDEdit upsampling (``refine``), and panorama -> mesh.

Outputs per sample ``i`` in ``--out`` (``pipelines/outputs.py``): ``{i:04d}_rgb.png`` (8-bit),
``{i:04d}_depth.png`` (16-bit) and ``{i:04d}_depth_color.png`` (preview) or ``{i:04d}_normal.png``,
``{i:04d}.npz`` (float32 ``rgb`` and ``depth``/``normal`` in [0, 1]) and ``{i:04d}.json`` (prompt, seed,
settings, model paths).

``depth`` is for photos (``pipelines/photos.py``): ``--image`` is a file, a folder or a glob of photos of any
size and format, each run at ``--processing-resolution`` and written back at its own size under its stem
(``{stem}_depth.png``, ``{stem}_depth_color.png``, ``{stem}.npy``, ``{stem}.json``, and with ``--ensemble`` > 1
``{stem}_uncertainty.png``). A photo that cannot be read is named in one line and skipped; the others are
written, and the run then exits 1 with the list of failures.

Each command is a row of ``COMMANDS``: the tasks it runs (``pipelines/tasks.py``; a choice of several is the
``--preset`` flag, with the official preset names), its default tiling and strength. A command takes only the
input flags its tasks use.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jointnet_jax import cli, io_utils, mesh
from jointnet_jax.pipelines.tasks import get_task

INPUT_HELP = {
    "image": "RGB input image",
    "photos": "photos: a file, a folder (its images) or a quoted glob; any size, 8/16-bit, grey/RGB/RGBA (alpha "
    "dropped), palette or CMYK, turned upright by EXIF",
    "init_depth": "refine this depth instead of starting from noise (SDEdit with --strength): a file (one photo) "
    "or a folder with {stem}.npy, {stem}_depth.png or {stem}.png per photo; 8/16-bit PNG or .npy in [0,1], near = "
    "bright",
    "depth": "depth input: 8/16-bit PNG or .npy in [0,1], near = bright (with --modality normal: a normal map)",
    "mask": "RGB mask, white = repaint",
    "depth_mask": "depth mask, white = repaint",
}


def _run(pipe, args, prompts, inputs, kw):
    return pipe.run(get_task(args.preset), prompts, **inputs, **kw)


def _panorama(pipe, args, prompts, inputs, kw):
    return pipe.panorama(prompts, **kw)


def _refine(pipe, args, prompts, inputs, kw):
    return pipe.refine(prompts, inputs.get("image"), inputs.get("depth"), preset=args.preset, scale=args.scale, **kw)


@dataclass(frozen=True)
class Command:
    """``presets``: the task names (``tasks.get_task``) the command can run, the first the default; ``tiling``:
    the default tiling preset of a tiled command; ``call``: how it calls the ``Pipeline``."""

    help: str
    presets: tuple[str, ...]
    tiling: str | None = None
    strength: float = 1.0
    call: Callable = _run
    photos: bool = False  # photos of any size, named by stem (pipelines/photos.py), instead of fixed-size samples

    @property
    def inputs(self) -> list[str]:
        """The input flags: every input any of its tasks needs, in a fixed order (for photos: the photos and
        an optional initial depth)."""
        if self.photos:
            return ["photos", "init_depth"]
        needed = {n for p in self.presets for n in get_task(p).needs}
        return [n for n in INPUT_HELP if n in needed]


COMMANDS = {
    "generate": Command("text -> RGB + depth", ("generate",)),
    "depth": Command("photos -> depth (or normals): any size, a file, a folder or a glob", ("depth",), photos=True),
    "image": Command("depth -> image", ("image",)),
    "inpaint": Command("RGBD editing with separate RGB and depth masks", ("inpaint",)),
    "panorama": Command(
        "text -> RGBD panorama, tile-based (2048x512 for SD2.1-base; --wrap for 360°)",
        ("generate",),
        "ours",
        1.0,
        _panorama,
    ),
    "pano-inpaint": Command("tile-based panorama inpainting/outpainting", ("rgb2j", "j2rgb", "custom"), "ours"),
    "refine": Command(
        "tile-based SDEdit upsampling/refinement of an RGBD pair", ("both", "image", "depth"), "upsample", 0.4, _refine
    ),
}


def _add_command(p: argparse.ArgumentParser, command: Command) -> None:
    cli.add_model_arguments(p)
    cli.add_prompt_arguments(p)
    cli.add_sampler_arguments(p, cfg=1.0 if command.photos else 7.5)
    if command.photos:
        _photo_args(p)
    else:
        cli.add_size_arguments(p, "the input's size, else the model's (512 for SD2.1-base)")
        p.add_argument("--num-samples", type=cli.POSITIVE_INT, default=1, help="samples per prompt")
        p.add_argument("--init-noise", help=".npy initial latents (B, h, w, 8) NHWC, RGB first, unscaled N(0,1)")
        p.add_argument(
            "--repeats",
            type=cli.POSITIVE_INT,
            default=1,
            help="sample this many times with the same inputs and seeds (the first call compiles), printing each "
            "call's time: warm latency from the CLI itself; the outputs are the last call's",
        )
    p.add_argument("--modality", choices=("depth", "normal"), default="depth")
    p.add_argument("--masked-conditioning", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--out", required=True)
    if command.presets != ("generate",):
        p.add_argument(
            "--strength",
            type=cli.FRACTION,
            default=command.strength,
            help="SDEdit start point (1 = noise; 0 = the inputs through the VAE)",
        )
    if len(command.presets) > 1:
        p.add_argument("--preset", choices=command.presets, default=command.presets[0], help="what to generate")
    for name in command.inputs:
        flag = "image" if name == "photos" else name.replace("_", "-")
        p.add_argument(
            f"--{flag}", dest="image" if name == "photos" else name, help=INPUT_HELP[name], required=name == "photos"
        )
    if command.tiling:
        _tiling_args(p, command.tiling)


def _photo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--processing-resolution",
        type=cli.COUNT,
        help="longest side the model runs at, rounded to its size multiple (default: its native size, 512 for "
        "SD2.1-base; 0: each photo's own size)",
    )
    p.add_argument("--ensemble", type=cli.POSITIVE_INT, default=1, help="samples per photo, aligned and merged")
    p.add_argument("--batch-size", type=cli.POSITIVE_INT, default=1, help="photos of one size per model call")
    p.add_argument(
        "--init-depth-model",
        help="refine this DPT model's depth instead of starting from noise (paper Tab. 6; a transformers "
        "DPTForDepthEstimation folder or Hub id such as Intel/dpt-hybrid-midas, run as the labelling job does; "
        "needs torch: the label extra)",
    )


def _tiling_args(p: argparse.ArgumentParser, mode: str):
    """Tiling flags; unset ones keep the preset's values (``jointnet_jax.pipelines.tiles``)."""
    from jointnet_jax.pipelines.tiles import MODES

    g = p.add_argument_group("tiling (sizes in latent pixels)")
    g.add_argument("--tiling", choices=MODES, default=mode, help=f"preset (default {mode}); none = non-tiled")
    g.add_argument(
        "--tile", type=cli.POSITIVE_INT, help="tile side (default: the UNet's sample_size, 64 for SD2.1-base)"
    )
    g.add_argument("--stride", type=cli.POSITIVE_INT, help="tile stride (ours: tile/2, multidiffusion: tile/8)")
    g.add_argument("--tile-batch", type=cli.POSITIVE_INT, help="tiles per model call (default 8)")
    g.add_argument("--wrap", action="store_true", default=None, help="circular columns: 360° panorama")
    g.add_argument("--random-offset", action=argparse.BooleanOptionalAction, help="random grid offset per step")
    g.add_argument("--ramp", type=cli.COUNT, help="linear weight decay width at tile borders (0 = constant)")
    g.add_argument("--full-view-fraction", type=cli.FRACTION, help="whole canvas as a view for this share of steps")
    g.add_argument("--full-view-weight", type=cli.NON_NEGATIVE, help="the whole-canvas view's weight (default 5)")
    g.add_argument(
        "--full-view-resize",
        action=argparse.BooleanOptionalAction,
        help="full view = the canvas resized to one tile (paper; one tile's compute) instead of the full canvas",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jointnet-sample", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        _add_command(sub.add_parser(name, help=command.help), command)
    sub.choices["refine"].add_argument(
        "--scale", type=cli.number(low=0, above=True), default=2.0, help="output size / input size"
    )
    _mesh_args(sub.add_parser("mesh", help="RGBD panorama -> GLB/PLY mesh"))
    return parser


def read_inputs(args) -> dict:
    """The command's input files as arrays (images, depth or normal maps, masks)."""
    readers = {
        "image": io_utils.read_image,
        "depth": io_utils.read_image if args.modality == "normal" else io_utils.read_depth,
        "mask": io_utils.read_mask,
        "depth_mask": io_utils.read_mask,
    }
    return {name: readers[name](getattr(args, name)) for name in readers if getattr(args, name, None)}


def _settings(args):
    from jointnet_jax.pipelines import SampleSettings

    return SampleSettings(
        steps=args.steps,
        cfg=args.cfg,
        guidance_rescale=args.guidance_rescale,
        sampler=args.sampler,
        eta=args.eta,
        height=getattr(args, "height", None),
        width=getattr(args, "width", None),
        num_samples=getattr(args, "num_samples", 1),
        seed=args.seed,
        strength=getattr(args, "strength", 1.0),
        negative_prompt=args.negative_prompt,
        masked_conditioning={"auto": None, "on": True, "off": False}[args.masked_conditioning],
    )


def _init_noise(path):
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"initial noise file {path} does not exist")
    return np.load(path)


def run_command(args) -> list[Path]:
    from jointnet_jax.pipelines import Pipeline
    from jointnet_jax.pipelines.outputs import write_outputs

    command = COMMANDS[args.command]
    args.preset = getattr(args, "preset", command.presets[0])
    if command.photos:
        return run_photos(args)
    cli.check_output_folder(args.out)  # before anything slow: a bad --out is found now, not after sampling
    prompts, inputs, settings = cli.read_prompts(args), read_inputs(args), _settings(args)
    init_noise = _init_noise(args.init_noise)
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.base, args.model, dtype=cli.jax_dtype(args.dtype), modality=args.modality)
    tiling = _tiling(args, pipe) if command.tiling else None
    timings = {"load": time.perf_counter() - start, "sample": []}
    for i in range(args.repeats):
        t0 = time.perf_counter()
        call = dict(init_noise=init_noise, settings=settings, tiling=tiling)
        result = command.call(pipe, args, prompts, inputs, call)  # numpy outputs: the call has finished
        timings["sample"].append(time.perf_counter() - t0)
        if args.repeats > 1:
            print(f"call {i + 1}/{args.repeats}: {timings['sample'][-1]:.3f} s", flush=True)
    batch_prompts = [p for p in prompts for _ in range(args.num_samples)]
    record = _record(args, settings, tiling) | {"timings_s": timings}
    written = write_outputs(Path(args.out), result, batch_prompts, record, args.modality)
    print(
        f"wrote {len(written)} samples to {args.out} in {time.perf_counter() - start:.1f} s (loading "
        f"{timings['load']:.1f} s; sampling, from the text encoder to the decoded images: "
        f"{timings['sample'][-1]:.3f} s{' on the last call' if args.repeats > 1 else ''})"
    )
    return written


def run_photos(args) -> list[Path]:
    """``sample depth``: every photo of ``--image`` through ``photos.predict``, each written as it is done; a
    photo that fails is named on stderr and skipped, and the run ends in one error listing them."""
    from tqdm.auto import tqdm

    from jointnet_jax.pipelines import Pipeline, photos
    from jointnet_jax.pipelines.outputs import write_prediction

    cli.check_output_folder(args.out)
    files = io_utils.list_images(args.image)
    _check_unique_stems(files)
    prompts = cli.read_prompts(args) if args.prompt or args.prompts_file else []
    if len(prompts) > 1:
        raise ValueError(f"depth takes one prompt for all photos, got {len(prompts)}")
    settings, failures = _settings(args), {}
    estimate = _depth_estimator(args)
    items = [_photo(path, args, failures, len(files) == 1, estimate) for path in files]
    items = [item for item in items if item is not None]
    pipe = Pipeline.from_pretrained(args.base, args.model, dtype=cli.jax_dtype(args.dtype), modality=args.modality)
    request = photos.Request(settings, (prompts or [""])[0], args.processing_resolution, args.ensemble, args.batch_size)
    record, written = _record(args, settings, None), []
    with tqdm(total=len(files), initial=len(failures), desc="photos", unit="photo") as bar:
        for i, result in photos.predict(pipe, items, request):
            path = Path(items[i].name)
            if isinstance(result, Exception):
                failures[path] = str(result)
                tqdm.write(f"error: {result}", file=sys.stderr)
            else:
                info = {"input": str(path.resolve()), "input_size": list(items[i].size)}
                info |= {"processing_size": list(result["processing_size"]), "ensemble": args.ensemble}
                written.append(write_prediction(args.out, path.stem, result, {**record, **info}, args.modality))
            bar.update(1)
    if failures:
        names = ", ".join(str(p) for p in failures)
        raise ValueError(
            f"{len(failures)} of {len(files)} photos failed ({names}); the other {len(written)} are in {args.out}"
        )
    print(f"wrote {len(written)} predictions to {args.out}")
    return written


def _check_unique_stems(files: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise ValueError(f"{seen[f.stem]} and {f} would write the same outputs ({f.stem}_*); rename one")
        seen[f.stem] = f


def _depth_estimator(args):
    """``--init-depth-model``: a function photo path -> its DPT depth (normalised inverse depth at the photo's
    size, as the labelling job stores it), or None without the flag."""
    if not args.init_depth_model:
        return None
    if args.init_depth:
        raise ValueError("give --init-depth or --init-depth-model, not both")
    if args.modality != "depth":
        raise ValueError("--init-depth-model predicts depth; it cannot start --modality normal")
    try:
        from jointnet_jax.data.depth_estimator import DepthEstimator
    except ImportError as e:
        raise ImportError(f"--init-depth-model needs torch and transformers (pip install -e '.[label]'): {e}") from e
    estimator = DepthEstimator.from_pretrained(args.init_depth_model)
    return lambda path: estimator([io_utils.decode_rgb8(Path(path).read_bytes(), path)])[0][0]


def _photo(path: Path, args, failures: dict, single: bool, estimate=None):
    """The ``photos.Photo`` of one file (its size read from the header), or None with the failure noted."""
    from jointnet_jax.pipelines import photos

    try:
        init = _init_depth_file(path, args, single) if args.init_depth else None
        reader = io_utils.read_image if args.modality == "normal" else io_utils.read_depth
        load_init = (lambda: reader(init)) if init else (lambda: estimate(path)) if estimate else None
        return photos.Photo(str(path), io_utils.image_size(path), lambda: io_utils.read_image(path), load_init)
    except (ValueError, FileNotFoundError) as e:
        failures[path] = str(e)
        print(f"error: {e}", file=sys.stderr)
        return None


def _init_depth_file(photo: Path, args, single: bool) -> Path:
    """The initial depth for ``photo``: ``--init-depth`` itself when it is a file (one photo only), else the
    first of ``{stem}.npy``, ``{stem}_depth.png``, ``{stem}.png`` in that folder."""
    given = Path(args.init_depth)
    if given.is_file():
        if not single:
            raise ValueError(f"--init-depth {given} is one file but --image names several photos; give a folder")
        return given
    if not given.is_dir():
        raise FileNotFoundError(f"--init-depth {given} is neither a file nor a folder")
    for name in (f"{photo.stem}.npy", f"{photo.stem}_depth.png", f"{photo.stem}.png"):
        if (given / name).is_file():
            return given / name
    raise FileNotFoundError(f"no initial depth for {photo} in {given} ({photo.stem}.npy, _depth.png or .png)")


def _record(args, settings, tiling) -> dict:
    """What the run was, written next to every sample."""
    names = ("image", "depth", "mask", "depth_mask", "init_noise", "init_depth", "init_depth_model")
    return {
        "task": args.command,
        "preset": args.preset,
        "settings": settings.__dict__,
        "base": _source(args.base),
        "model": _source(args.model),
        "modality": args.modality,
        "dtype": args.dtype,
        "tiling": None if tiling is None else dataclasses.asdict(tiling),
        "inputs": {k: _source(getattr(args, k)) for k in names if getattr(args, k, None)},
    }


def _source(name: str) -> str:
    """How a model was given, for the record: a local folder's absolute path, or the Hub id as it is."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def _tiling(args, pipe):
    """The run's ``Tiling`` (None for non-tiled): the preset with the flags that were given."""
    names = ("stride", "wrap", "random_offset", "ramp", "full_view_fraction", "full_view_weight", "full_view_resize")
    overrides = {name: getattr(args, name) for name in names} | {"batch": args.tile_batch}
    return pipe.native_tiling(args.tiling, args.tile, **overrides)


def _mesh_args(parser: argparse.ArgumentParser) -> None:
    """The ``mesh`` options (``mesh.panorama_to_mesh``'s arguments), every number checked finite and in range."""
    positive = cli.number(low=0, above=True)
    parser.add_argument("--rgb", required=True, help="panorama RGB image")
    parser.add_argument("--depth", required=True, help="inverse depth in [0,1]: 8/16-bit PNG or .npy")
    parser.add_argument("--out", required=True, help="output mesh, .glb or .ply")
    parser.add_argument(
        "--span", type=cli.number(low=0, high=360, above=True), default=360.0, help="horizontal field of view, degrees"
    )
    parser.add_argument("--scale", type=cli.number(), default=1.0, help="distance = 1 / (v * scale + shift)")
    parser.add_argument("--shift", type=cli.number(), default=0.0, help="distance = 1 / (v * scale + shift)")
    parser.add_argument("--near", type=positive, default=1e-5, help="minimum distance")
    parser.add_argument("--far", type=positive, default=1e5, help="maximum distance")
    parser.add_argument("--projection", choices=mesh.PROJECTIONS, default="cylindrical")
    parser.add_argument(
        "--wrap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="join the last column to the first (default: when --span is 360)",
    )
    parser.add_argument(
        "--max-depth-ratio",
        type=cli.NON_NEGATIVE,
        default=mesh.DEFAULT_MAX_DEPTH_RATIO,
        help="drop triangles whose vertex distances differ by more than this factor; 0 keeps all",
    )


def run_mesh(args: argparse.Namespace) -> Path:
    """Build and save the mesh the ``mesh`` options describe; returns the output path."""
    rgb, depth = io_utils.read_image(args.rgb), io_utils.read_depth(args.depth)
    if rgb.shape[:2] != depth.shape:
        raise ValueError(
            f"size mismatch: {args.rgb} is {rgb.shape[0]}x{rgb.shape[1]} but {args.depth} is "
            f"{depth.shape[0]}x{depth.shape[1]} (HxW)"
        )
    if args.near >= args.far:
        raise ValueError(f"--near {args.near:g} must be below --far {args.far:g}")
    built = mesh.panorama_to_mesh(
        rgb,
        depth,
        span=args.span,
        wrap=args.wrap,
        scale=args.scale,
        shift=args.shift,
        near=args.near,
        far=args.far,
        projection=args.projection,
        max_depth_ratio=args.max_depth_ratio or None,
    )
    return mesh.save_mesh(built, args.out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "mesh":
        return cli.run(lambda: print(f"wrote {run_mesh(args)}"))
    return cli.run(lambda: run_command(args))


if __name__ == "__main__":
    sys.exit(main())
