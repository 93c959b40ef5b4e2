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
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from jointnet_jax.diffusion.samplers import make_sampler
from jointnet_jax.diffusion.schedule import NoiseSchedule, load_schedule
from jointnet_jax.models import hub
from jointnet_jax.models.clip_text import load_text_encoder, load_tokenizer
from jointnet_jax.models.functional import compiled
from jointnet_jax.models.jointnet import JointNet
from jointnet_jax.models.pixel_space import branch_codecs
from jointnet_jax.models.vae import load_vae
from jointnet_jax.pipelines import loop
from jointnet_jax.pipelines.tasks import latent_mask, task_masks
from jointnet_jax.pipelines.tiles import TileGrid, Tiling
from jointnet_jax.pretrained import load_jointnet

WRAP_DECODE_COLUMNS = 8  # latent columns copied onto each side to decode a wrapped canvas (official)
REFINE_PRESETS = {"both": "refine", "image": "image", "depth": "depth"}
BASE_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "scheduler")  # what a pipeline reads from the base
SCHEDULERS = {"ddim": "ddim", "dpmpp2m": "dpmpp_2m", "euler": "euler", "euler_a": "euler_ancestral"}


@dataclass
class SampleSettings:
    """Everything that shapes one sampling run (written next to every output)."""

    steps: int = 50
    cfg: float = 7.5
    guidance_rescale: float = 0.0
    scheduler: str = "ddim"
    eta: float = 0.0
    height: int | None = None
    width: int | None = None
    num_samples: int = 1
    seed: int = 0
    strength: float = 1.0
    negative_prompt: str = ""
    masked_conditioning: bool | None = None  # None: use it when the model has the layer


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
        return cls(
            jn,
            load_vae(base / "vae", dtype=dtype, variant=variant) if (base / "vae").exists() else None,
            load_text_encoder(base / "text_encoder", dtype=dtype, variant=variant),
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
        ids = self.tokenizer(
            unique,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids
        emb = self._text(jnp.asarray(ids, jnp.int32))
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

    def depth(self, prompts, image, **kw):
        """Image -> depth: RGB known, dense generated (official rgb2j preset)."""
        return self.run("depth", prompts, image=image, **kw)

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
            image = _resize(image, size, Image.LANCZOS)
        if preset != "image":
            depth = _resize(depth, size, Image.NEAREST)
        return self.run(REFINE_PRESETS[preset], prompts, image=image, depth=depth, settings=s, tiling=tiling, **kw)

    def sampler(self, kind, steps, strength=1.0, eta=0.0):
        """Samplers compare by value, so the compiled loop is shared by equal settings."""
        if kind not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {kind!r}; expected one of {', '.join(SCHEDULERS)}")
        return make_sampler(SCHEDULERS[kind], self.schedule, steps, strength=strength, eta=eta)

    def run(
        self,
        task,
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
        """Sample ``num_samples`` per prompt. Returns a dict of float32 numpy arrays: ``rgb`` (B, H, W, 3),
        ``depth`` (B, H, W) or ``normal`` (B, H, W, 3), and the final ``latents`` (B, h, w, 8).
        ``tiling``: tile-based denoising of the canvas (a ``tiles.Tiling`` or a preset name for the native
        tile, see ``tiles.MODES``); None denoises it whole."""
        s = settings or SampleSettings()
        s = SampleSettings(**{**s.__dict__, **overrides})
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch_prompts = [p for p in prompts for _ in range(s.num_samples)]
        b = len(batch_prompts)
        height, width = self._resolve_size(s, image, depth)
        self._check_size(height, width)
        if not 0.0 < s.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {s.strength}")
        if task == "generate" and s.strength != 1.0:
            raise ValueError("strength < 1 needs an input image or depth (SDEdit); generate starts from noise")
        if task == "refine" and s.strength == 1.0:
            raise ValueError("refine is SDEdit: give a strength below 1 (official 0.4)")
        grid = self._tile_grid(tiling, height, width)
        m_rgb, m_dense = task_masks(task, b, height, width, mask, depth_mask)
        masked = self.jointnet.masked_input if s.masked_conditioning is None else s.masked_conditioning
        if masked and not self.jointnet.masked_input:
            raise ValueError(
                "masked-latent conditioning was requested but this model has no "
                "jointnet_masked_latent_conv (use an inpainting checkpoint such as rgbd_inpaint)"
            )

        key_noise, key_vae, key_loop = jax.random.split(jax.random.key(s.seed), 3)
        f = self.vae_factor
        h, w = height // f, width // f
        c_rgb, c_dense = self.channels
        noise = self._initial_noise(init_noise, key_noise, (b, h, w, c_rgb + c_dense))
        sampler = self.sampler(s.scheduler, s.steps, float(s.strength), float(s.eta))

        known = None
        if task != "generate":
            rgb_in = (
                _fit_batch(image, b, (height, width, 3), "image")
                if image is not None
                else np.zeros((b, height, width, 3), np.float32)
            )
            dense_in = (
                self.dense_to_image(
                    _fit_batch(depth, b, (height, width) + ((3,) if self.modality == "normal" else ()), self.modality)
                )
                if depth is not None
                else np.zeros((b, height, width, 3), np.float32)
            )
            if task in ("depth", "inpaint", "refine") and image is None:
                raise ValueError(f"task {task!r} needs an input image")
            if task in ("image", "inpaint", "refine") and depth is None:
                raise ValueError(f"task {task!r} needs an input {self.modality} map")
            known = self._encode_known(rgb_in, dense_in, key_vae)
        lm_rgb = jnp.asarray(latent_mask(m_rgb, f))[..., None]
        lm_dense = jnp.asarray(latent_mask(m_dense, f))[..., None]
        generate = jnp.concatenate([jnp.repeat(lm_rgb, c_rgb, -1), jnp.repeat(lm_dense, c_dense, -1)], axis=-1)
        cond_rgb = cond_dense = None
        if self.jointnet.masked_input:
            # A masked-input model always takes the conditioning; with it off, the model is told that nothing
            # is known (masks 1, no masked latents: the stage-3 "none" masks) and only the replacement keeps
            # the known region.
            cm_rgb, cm_dense = (lm_rgb, lm_dense) if masked else (jnp.ones_like(lm_rgb), jnp.ones_like(lm_dense))
            given = known if known is not None else jnp.zeros((b, h, w, c_rgb + c_dense))
            kr, kd = given[..., :c_rgb], given[..., c_rgb:]
            cond_rgb = jnp.concatenate([cm_rgb, (cm_rgb < 0.5) * kr], axis=-1)
            cond_dense = jnp.concatenate([cm_dense, (cm_dense < 0.5) * kd], axis=-1)
        x = noise * sampler.init_noise_sigma if s.strength == 1.0 else sampler.add_noise_at(known, noise, 0)

        guided = s.cfg > 1.0
        text = self.encode_text(batch_prompts)
        if guided:
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
        inputs = self._shard(inputs, b)
        with _progress_bar(progress, sampler.num_steps, task):
            latents = loop.denoise(
                self._graphdef,
                self._state,
                sampler,
                inputs,
                jnp.float32(s.cfg),
                jnp.float32(s.guidance_rescale),
                key_loop,
                guided=guided,
                progress=progress is not False,
                tiling=grid,
            )
        wrap = grid is not None and grid.tiling.wrap
        out = {"rgb": self.decode_latents(latents[..., :c_rgb], wrap, 0), "latents": np.asarray(latents)}
        dense = self.decode_latents(latents[..., c_rgb:], wrap, 1)
        if self.modality == "depth":
            out["depth"] = dense[..., 0]
        else:
            out["normal"] = dense
        return out

    # -------------------------------------------------------------------------------------------------

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

    def _initial_noise(self, init_noise, key, shape):
        if init_noise is None:
            return jax.random.normal(key, shape, jnp.float32)
        init_noise = np.asarray(init_noise, np.float32)
        if init_noise.shape != shape:
            raise ValueError(f"initial noise has shape {init_noise.shape}; this run needs {shape} (B, h, w, 8)")
        if not np.isfinite(init_noise).all():
            raise ValueError("initial noise contains NaN or inf")
        return jnp.asarray(init_noise)

    def _shard(self, inputs, batch):
        """Data-parallel over local devices when there are several and the batch divides evenly."""
        devices = jax.local_devices()
        if len(devices) == 1 or batch % len(devices):
            return inputs
        sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
        return jax.tree.map(lambda a: jax.device_put(a, sharding), inputs)


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


def _split_settings(settings: SampleSettings, kw: dict) -> tuple[SampleSettings, dict]:
    """A copy of ``settings`` with the ``SampleSettings`` fields of ``kw`` applied, and the other keywords."""
    fields = {k: v for k, v in kw.items() if k in SampleSettings.__dataclass_fields__}
    return SampleSettings(**{**settings.__dict__, **fields}), {k: v for k, v in kw.items() if k not in fields}


def _resize(array, size, resample) -> np.ndarray:
    """Resize (H, W) or (H, W, C) float maps channel by channel with PIL (float mode keeps the precision)."""
    a = np.asarray(array, np.float32)
    if a.shape[:2] == tuple(size):
        return a
    channels = [a] if a.ndim == 2 else list(np.moveaxis(a, -1, 0))
    out = [np.asarray(Image.fromarray(c).resize(size[::-1], resample)) for c in channels]
    return np.clip(out[0] if a.ndim == 2 else np.stack(out, -1), 0, 1)


@contextlib.contextmanager
def _progress_bar(progress, total, desc):
    if progress is False:
        yield
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="step", leave=False) as bar:
        loop._PROGRESS["bar"] = bar
        try:
            yield
        finally:
            loop._PROGRESS["bar"] = None
