"""``Pipeline``: JointNet + VAE + text encoder + schedule, with one method per task.

Encoding and decoding follow the official code (docs/official-differences.md): depth is normalised inverse
depth in [0, 1] (near = bright), fed as a gray image replicated to 3 channels through the RGB VAE; inputs are
encoded with a posterior *sample* scaled by the VAE's scaling factor; each half of the joint latent is
decoded separately and the dense half keeps channel 0 (depth) or all 3 (normals). Pixel-space models (no VAE,
``vae=None``) use one ``PixelSpace`` codec per branch instead (RGB 3 channels, depth 1). All denoising
goes through ``loop.denoise``; tiled tasks (panorama, refine, panorama inpainting) pass it a static
``tiles.TileGrid``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from jointnet_jax import sharding
from jointnet_jax.diffusion.samplers import make_sampler
from jointnet_jax.diffusion.schedule import NoiseSchedule, load_schedule
from jointnet_jax.models import hub
from jointnet_jax.models.clip_text import tokenize
from jointnet_jax.models.functional import compiled
from jointnet_jax.models.jointnet import JointNet
from jointnet_jax.models.loading import check_compatible, load_jointnet, load_text_encoder, load_tokenizer, load_vae
from jointnet_jax.models.pixel_space import branch_codecs
from jointnet_jax.pipelines import loop, photos
from jointnet_jax.pipelines.tasks import Task, get_task, latent_mask
from jointnet_jax.pipelines.tiles import TileGrid, Tiling

WRAP_DECODE_COLUMNS = 8  # latent columns copied onto each side to decode a wrapped canvas (official)
BASE_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "scheduler")  # what a pipeline reads from the base
REFINE_PRESETS = ("both", "image", "depth")  # what ``refine`` regenerates (task names, "both" = refine)


@dataclass
class SampleSettings:
    """Everything that shapes one sampling run (written next to every output). ``sampler``: any name of
    ``diffusion.SAMPLER_NAMES``; ``scheduler`` is its old spelling, still accepted."""

    steps: int = 50
    cfg: float = 7.5
    guidance_rescale: float = 0.0
    sampler: str = "ddim"
    eta: float = 0.0
    height: int | None = None
    width: int | None = None
    num_samples: int = 1
    seed: int = 0
    strength: float = 1.0
    negative_prompt: str = ""
    masked_conditioning: bool | None = None  # None: use it when the model has the layer
    scheduler: dataclasses.InitVar[str | None] = None

    def __post_init__(self, scheduler):
        if scheduler is not None:
            self.sampler = scheduler


class Pipeline:
    def __init__(
        self, jointnet: JointNet, vae, text_encoder, tokenizer, schedule: NoiseSchedule, *, modality: str = "depth"
    ):
        """``jointnet``: a ``JointNet`` (or anything with its call signature, ``channels``, ``config`` and
        ``masked_input``, e.g. ``DirectExtend``); ``vae``: an ``AutoencoderKL``, or None for pixel space."""
        if modality not in ("depth", "normal"):
            raise ValueError(f"modality must be 'depth' or 'normal', not {modality!r}")
        self.jointnet, self.vae, self.text_encoder, self.tokenizer = jointnet, vae, text_encoder, tokenizer
        self.schedule, self.modality = schedule, modality
        self.channels = jointnet.channels
        self.codecs = branch_codecs(vae, *self.channels)
        self._graphdef, self._state = nnx.split(jointnet)
        self._encode = [compiled(c, "encode") for c in self.codecs]
        self._decode = [compiled(c, "decode") for c in self.codecs]
        self._text = compiled(text_encoder)
        self._progress = loop.Progress()  # this pipeline's progress sink, shared by all its compiled loops

    @classmethod
    def from_pretrained(cls, base, model, *, dtype=jnp.float32, modality="depth", variant=None) -> Pipeline:
        """``base``: an SD2.1-base-style diffusers folder (vae/ text_encoder/ tokenizer/ scheduler/; without
        vae/ the model is pixel-space); ``model``: an official-layout JointNet folder (unet/ + jointnet/) or a
        loaded model. Both may be Hugging Face Hub ids (``stabilityai/stable-diffusion-2-1-base``), read from
        the local Hub cache when offline (``models.hub``); ``variant="fp16"`` reads half-precision files into
        float32 parameters."""
        base = hub.resolve(base, what="base model folder", subfolders=BASE_SUBFOLDERS, variant=variant)
        if not base.is_dir():
            raise FileNotFoundError(f"base model folder {base} does not exist")
        jn = load_jointnet(model, dtype=dtype, variant=variant) if isinstance(model, str | Path) else model
        vae = load_vae(base / "vae", dtype=dtype, variant=variant) if (base / "vae").exists() else None
        text_encoder = load_text_encoder(base / "text_encoder", dtype=dtype, variant=variant)
        name = model if isinstance(model, str | Path) else type(model).__name__
        check_compatible(jn, vae, text_encoder, model_name=name, base=base)
        return cls(
            jn,
            vae,
            text_encoder,
            load_tokenizer(base / "tokenizer"),
            load_schedule(base / "scheduler"),
            modality=modality,
        )

    # -------------------------------------------------------------------------------------------------
    # Geometry, text, VAE

    @property
    def vae_factor(self) -> int:
        return self.codecs[0].scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of the VAE factor times the UNet's total downsampling."""
        return self.vae_factor * 2 ** (len(self.jointnet.config.block_out_channels) - 1)

    def default_size(self) -> int:
        return (self.jointnet.config.sample_size or 64) * self.vae_factor

    def _check_size(self, height, width):
        m = self.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {m}; got {height}x{width}")

    def encode_text(self, prompts: list[str]) -> jax.Array:
        """Embeddings (P, L, D); each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))
        emb = self._text(jnp.asarray(tokenize(self.tokenizer, unique), jnp.int32))
        return emb[jnp.asarray([unique.index(p) for p in prompts])]

    def encode_images(self, images, key, branch: int = 0) -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] -> scaled latents of ``branch`` (0 RGB, 1 dense) from a posterior
        sample (official)."""
        posterior = self._encode[branch](jnp.asarray(images) * 2 - 1)
        return posterior.sample(key) * self.codecs[branch].scaling_factor

    def decode_latents(self, latents, wrap: bool = False, branch: int = 0) -> np.ndarray:
        """Scaled latents (B, h, w, C) of ``branch`` -> images (B, H, W, 3) in [0, 1]. ``wrap``: a 360°
        canvas is decoded with its opposite columns attached on each side, then cropped, so the seam has no
        border effects."""
        pad = min(WRAP_DECODE_COLUMNS, latents.shape[2]) if wrap else 0
        if pad:
            latents = jnp.concatenate([latents[:, :, -pad:], latents, latents[:, :, :pad]], axis=2)
        codec = self.codecs[branch]
        images = self._decode[branch](latents / codec.scaling_factor)
        images = np.asarray(jnp.clip(images / 2 + 0.5, 0, 1), np.float32)
        cut = pad * self.vae_factor
        return images[:, :, cut : images.shape[2] - cut]

    def dense_to_image(self, dense) -> np.ndarray:
        """Depth (B, H, W) -> gray 3-channel image; normals (B, H, W, 3) pass through."""
        dense = np.asarray(dense, np.float32)
        return np.repeat(dense[..., None], 3, -1) if self.modality == "depth" else dense

    # -------------------------------------------------------------------------------------------------
    # Tasks (all go through ``run``)

    def generate(self, prompts, **kw):
        """Text -> RGB + depth (or normals), from noise."""
        return self.run("generate", prompts, **kw)

    def depth(
        self,
        images,
        image=None,
        *,
        prompt: str = "",
        processing_resolution: int | None = None,
        ensemble: int = 1,
        init_depth=None,
        batch_size: int = 1,
        settings: SampleSettings | None = None,
        **kw,
    ):
        """Image -> depth (or normals): RGB known, dense generated (official rgb2j preset).

        ``pipe.depth(images, ...)``: photos of any size (one (H, W, 3) array in [0, 1], or a list of them, or a
        (B, H, W, 3) batch), each run at its processing size and returned at its own size (``photos.py``): a
        dict, or a list of dicts for several, with ``depth`` (H, W) or ``normal`` (H, W, 3), ``uncertainty``
        and ``processing_size``. ``processing_resolution``: the longest side it runs at (default: the model's
        native size; 0: the photo's own size, rounded); ``ensemble``: samples merged per photo;
        ``init_depth``: a map (or one per photo) to refine by SDEdit with ``strength``; ``batch_size``: photos
        per model call. Sampling settings (``steps``, ``seed``, ``cfg``, ``strength``, ...) as for ``run``.

        ``pipe.depth(prompts, image, ...)`` (a prompt or a list of prompts first) is the fixed-size task:
        ``run("depth", prompts, image=image, ...)``, the image already at a size the model runs.
        """
        if isinstance(images, str) or (isinstance(images, list | tuple) and images and isinstance(images[0], str)):
            return self.run("depth", images, image=image, **kw)
        s, unknown = _split_settings(settings or SampleSettings(cfg=1.0), kw)
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
        single = isinstance(images, np.ndarray | jax.Array) and np.ndim(images) == 3
        arrays = [images] if single else list(images)
        inits = [None] * len(arrays) if init_depth is None else [init_depth] if single else list(init_depth)
        if len(inits) != len(arrays):
            raise ValueError(f"{len(arrays)} images but {len(inits)} initial maps (init_depth)")
        items = [
            photos.from_array(a, f"image {i}", init) for i, (a, init) in enumerate(zip(arrays, inits, strict=True))
        ]
        request = photos.Request(s, prompt, processing_resolution, ensemble, batch_size)
        results: list = [None] * len(items)
        for i, result in photos.predict(self, items, request):
            if isinstance(result, Exception):
                raise result
            results[i] = result
        return results[0] if single else results

    def image(self, prompts, depth, **kw):
        """Depth -> image: dense known, RGB generated (official j2rgb preset)."""
        return self.run("image", prompts, depth=depth, **kw)

    def inpaint(self, prompts, image, depth, mask, depth_mask, **kw):
        """RGBD editing: masks are 1 where to repaint, separately for RGB and dense."""
        return self.run("inpaint", prompts, image=image, depth=depth, mask=mask, depth_mask=depth_mask, **kw)

    def native_tiling(self, mode: str = "ours", tile: int | None = None, **overrides) -> Tiling | None:
        """A tiling preset (``tiles.Tiling.preset``); the tile defaults to the UNet's native latent size."""
        return Tiling.preset(mode, tile or self.jointnet.config.sample_size or 64, **overrides)

    def panorama(self, prompts, *, tiling: Tiling | str | None = "ours", settings: SampleSettings | None = None, **kw):
        """Text -> RGBD panorama, tile-based (paper §5.3). Default size: the native height and 4x the native
        width (2048x512 for SD2.1-base)."""
        s, kw = _split_settings(settings or SampleSettings(), kw)
        s.height, s.width = s.height or self.default_size(), s.width or 4 * self.default_size()
        return self.run("generate", prompts, settings=s, tiling=tiling, **kw)

    def refine(
        self,
        prompts,
        image=None,
        depth=None,
        *,
        preset: str = "both",
        scale: float = 2.0,
        tiling: Tiling | str | None = "upsample",
        settings: SampleSettings | None = None,
        **kw,
    ):
        """Upsample and refine an RGBD pair by tile-based SDEdit (paper §5.2, A.4; official upsample CLI).

        ``preset``: regenerate ``both`` sides, only the ``image`` (depth kept) or only the ``depth`` (image
        kept). The output size is ``height``/``width`` or the input's size times ``scale``; regenerated inputs
        are resized to it (image LANCZOS, depth NEAREST, as official), kept ones must already have it.
        Defaults: strength 0.4, tiles in both directions without full view or offset (official).
        Single inputs (H, W, 3) and (H, W) only.
        """
        if preset not in REFINE_PRESETS:
            raise ValueError(f"unknown refine preset {preset!r}; expected one of {', '.join(REFINE_PRESETS)}")
        if image is None or depth is None:
            raise ValueError("refine needs an input image and an input depth (or normal) map")
        s, kw = _split_settings(settings or SampleSettings(strength=0.4), kw)
        hw = np.shape(image)[-3:-1]
        s.height, s.width = s.height or round(hw[0] * scale), s.width or round(hw[1] * scale)
        size = (s.height, s.width)
        if preset != "depth":
            image = photos.resize(image, size, Image.LANCZOS)
        if preset != "image":
            depth = photos.resize(depth, size, Image.NEAREST)
        return self.run(get_task(preset), prompts, image=image, depth=depth, settings=s, tiling=tiling, **kw)

    def sampler(self, name, steps, strength=1.0, eta=0.0):
        """``name``: any of ``diffusion.SAMPLER_NAMES``. Samplers compare by value, so the compiled loop is
        shared by equal settings."""
        return make_sampler(name, self.schedule, steps, strength=strength, eta=eta)

    def run(
        self,
        task: str | Task,
        prompts,
        *,
        image=None,
        depth=None,
        mask=None,
        depth_mask=None,
        init_noise=None,
        progress=None,
        settings: SampleSettings | None = None,
        tiling: Tiling | str | None = None,
        **overrides,
    ):
        """Sample ``num_samples`` per prompt for ``task`` (a name of ``tasks.TASKS`` or an official preset
        name). Returns a dict of float32 numpy arrays: ``rgb`` (B, H, W, 3), ``depth`` (B, H, W) or
        ``normal`` (B, H, W, 3), and the final ``latents`` (B, h, w, 8). ``tiling``: tile-based denoising of
        the canvas (a ``tiles.Tiling`` or a preset name for the native tile, see ``tiles.MODES``); None
        denoises it whole. ``progress=False``: no progress bar (and no host callbacks in the loop)."""
        spec = get_task(task)
        s, unknown = _split_settings(settings or SampleSettings(), overrides)
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
        given = {"image": image, "depth": depth, "mask": mask, "depth_mask": depth_mask}
        spec.check(given, s.strength, self.modality)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch_prompts = [p for p in prompts for _ in range(s.num_samples)]
        size = self._resolve_size(s, image, depth)
        self._check_size(*size)
        grid = self._tile_grid(tiling, *size)
        key_noise, key_vae, key_loop = _run_keys(s.seed)
        if s.strength == 0.0:  # SDEdit that starts where it ends: the inputs through the VAE, nothing denoised
            known = self._encode_known(*self._known_images(given, len(batch_prompts), size), key_vae)
            return self._outputs(known, wrap=grid is not None and grid.tiling.wrap)
        sampler = self.sampler(s.sampler, s.steps, float(s.strength), float(s.eta))
        inputs = self._loop_inputs(spec, s, batch_prompts, given, size, sampler, init_noise, (key_noise, key_vae))
        sink = None if progress is False else self._progress
        with _progress_bar(sink, sampler.num_steps, spec.name):
            latents = loop.denoise(
                self._graphdef,
                self._state,
                sampler,
                inputs,
                jnp.float32(s.cfg),
                jnp.float32(s.guidance_rescale),
                key_loop,
                guided=s.cfg > 1.0,
                progress=sink,
                tiling=grid,
            )
        return self._outputs(latents, wrap=grid is not None and grid.tiling.wrap)

    # -------------------------------------------------------------------------------------------------

    def _loop_inputs(self, spec: Task, s, prompts, given, size, sampler, init_noise, keys) -> loop.LoopInputs:
        """Everything the loop needs, from the task's data: initial noise, the known latents (encoded
        inputs), the per-channel generate mask, the masked-latent conditioning and the text embeddings."""
        (height, width), f, b = size, self.vae_factor, len(prompts)
        c_rgb, c_dense = self.channels
        noise = self._initial_noise(init_noise, keys[0], (b, height // f, width // f, c_rgb + c_dense))
        m_rgb, m_dense = (jnp.asarray(latent_mask(m, f))[..., None] for m in spec.masks(b, height, width, given))
        known = self._encode_known(*self._known_images(given, b, size), keys[1]) if spec.has_known else None
        generate = jnp.concatenate([jnp.repeat(m_rgb, c_rgb, -1), jnp.repeat(m_dense, c_dense, -1)], axis=-1)
        cond_rgb, cond_dense = self._conditioning(s.masked_conditioning, m_rgb, m_dense, known, noise.shape)
        x = noise * sampler.init_noise_sigma if s.strength == 1.0 else sampler.add_noise_at(known, noise, 0)
        text = self.encode_text(prompts)
        if s.cfg > 1.0:
            text = jnp.concatenate([self.encode_text([s.negative_prompt] * b), text])
        inputs = loop.LoopInputs(
            x=x,
            noise=noise,
            known=known,
            generate=generate if known is not None else None,
            cond_rgb=cond_rgb,
            cond_dense=cond_dense,
            text=text,
        )
        return sharding.shard_batch(inputs, b)

    def _known_images(self, given, b, size):
        """The inputs as (B, H, W, 3) images in [0, 1]: RGB, and the dense map as an image; a side that is not
        given is black (zeros -> -1 after scaling), as the official presets build it."""
        black = np.zeros((b, *size, 3), np.float32)
        rgb = black if given["image"] is None else _fit_batch(given["image"], b, (*size, 3), "image")
        if given["depth"] is None:
            return rgb, black
        shape = (*size, 3) if self.modality == "normal" else size
        return rgb, self.dense_to_image(_fit_batch(given["depth"], b, shape, self.modality))

    def _conditioning(self, requested, m_rgb, m_dense, known, shape):
        """(cond_rgb, cond_dense) = [latent mask | masked latent] per branch for a masked-input model, else
        (None, None). With conditioning off (``requested=False``) such a model is told that nothing is known
        (masks 1, no masked latents: the stage-3 "none" masks); only the replacement keeps the known region."""
        if requested and not self.jointnet.masked_input:
            raise ValueError(
                "masked-latent conditioning was requested but this model has no "
                "jointnet_masked_latent_conv (use an inpainting checkpoint such as rgbd_inpaint)"
            )
        if not self.jointnet.masked_input:
            return None, None
        if requested is False:
            m_rgb, m_dense = jnp.ones_like(m_rgb), jnp.ones_like(m_dense)
        given = known if known is not None else jnp.zeros(shape)
        c_rgb = self.channels[0]
        return tuple(
            jnp.concatenate([m, (m < 0.5) * latent], axis=-1)
            for m, latent in ((m_rgb, given[..., :c_rgb]), (m_dense, given[..., c_rgb:]))
        )

    def _outputs(self, latents, wrap: bool) -> dict:
        """Decoded samples: ``rgb``, and ``depth`` (channel 0 of the decoded dense image) or ``normal``."""
        c_rgb = self.channels[0]
        dense = self.decode_latents(latents[..., c_rgb:], wrap, 1)
        out = {"rgb": self.decode_latents(latents[..., :c_rgb], wrap, 0), "latents": np.asarray(latents)}
        if self.modality == "depth":
            out["depth"] = dense[..., 0]
        else:
            out["normal"] = dense
        return out

    def _encode_known(self, rgb, dense, key) -> jax.Array:
        """Known inputs -> one joint latent. A shared VAE encodes both halves as one batch (official)."""
        if self.codecs[0] is self.codecs[1]:
            latents = self.encode_images(np.concatenate([rgb, dense]), key)
            return jnp.concatenate(jnp.split(latents, 2), axis=-1)
        k_rgb, k_dense = jax.random.split(key)
        return jnp.concatenate([self.encode_images(rgb, k_rgb, 0), self.encode_images(dense, k_dense, 1)], axis=-1)

    def _resolve_size(self, s, image, depth):
        """Explicit size, else the input's size, else the model's native size."""
        if image is not None:
            hw = np.shape(image)[-3:-1]
        elif depth is not None:
            hw = np.shape(depth)[-3:-1] if self.modality == "normal" else np.shape(depth)[-2:]
        else:
            hw = (self.default_size(),) * 2
        return int(s.height or hw[0]), int(s.width or hw[1])

    def _tile_grid(self, tiling: Tiling | str | None, height: int, width: int) -> TileGrid | None:
        """The static tile schedule; tiles must be a size the UNet can run (multiples of its downsampling)."""
        if isinstance(tiling, str):
            tiling = self.native_tiling(tiling)
        if tiling is None:
            return None
        m = self.size_multiple // self.vae_factor
        if tiling.tile % m:
            raise ValueError(f"the tile size must be a multiple of {m} latent pixels; got {tiling.tile}")
        return TileGrid(tiling, height // self.vae_factor, width // self.vae_factor)

    def seed_noise(self, seed: int, batch: int, height: int, width: int) -> np.ndarray:
        """The initial noise ``run`` draws from ``seed`` for ``batch`` samples of ``height`` x ``width`` pixels:
        (B, h, w, RGB + dense channels) float32."""
        f = self.vae_factor
        shape = (batch, height // f, width // f, sum(self.channels))
        return np.asarray(jax.random.normal(_run_keys(seed)[0], shape, jnp.float32))

    def _initial_noise(self, init_noise, key, shape):
        if init_noise is None:
            return jax.random.normal(key, shape, jnp.float32)
        init_noise = np.asarray(init_noise, np.float32)
        if init_noise.shape != shape:
            raise ValueError(f"initial noise has shape {init_noise.shape}; this run needs {shape} (B, h, w, 8)")
        if not np.isfinite(init_noise).all():
            raise ValueError("initial noise contains NaN or inf")
        return jnp.asarray(init_noise)


def _fit_batch(array, batch, shape, name):
    """One input (shape) or a batch (B, *shape) -> (B, *shape) float32, with a clear size error."""
    a = np.asarray(array, np.float32)
    if a.shape == shape:
        a = a[None]
    if a.shape[1:] != shape or a.shape[0] not in (1, batch):
        raise ValueError(f"{name} input has shape {a.shape[-len(shape) :]} but this run needs {shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} input contains NaN or inf")
    return np.broadcast_to(a, (batch, *shape))


def _run_keys(seed: int):
    """(initial noise, VAE posterior sample, loop) keys of a run with ``seed``."""
    return jax.random.split(jax.random.key(seed), 3)


def _split_settings(settings: SampleSettings, kw: dict) -> tuple[SampleSettings, dict]:
    """A copy of ``settings`` with the ``SampleSettings`` fields of ``kw`` applied (``scheduler`` meaning
    ``sampler``), and the other keywords."""
    kw = dict(kw)
    if "scheduler" in kw:
        kw["sampler"] = kw.pop("scheduler")
    fields = {k: v for k, v in kw.items() if k in SampleSettings.__dataclass_fields__ and k != "scheduler"}
    return SampleSettings(**{**settings.__dict__, **fields}), {k: v for k, v in kw.items() if k not in fields}


@contextlib.contextmanager
def _progress_bar(sink: loop.Progress | None, total: int, desc: str):
    """A tqdm bar fed by the compiled loop's step callbacks through ``sink`` (nothing when it is None)."""
    if sink is None:
        yield
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="step", leave=False) as bar:
        sink.bar = bar
        try:
            yield
        finally:
            sink.bar = None
