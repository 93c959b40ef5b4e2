"""Tile-based generation (paper §4.2; official ``jointnetpano_pipeline``): the canvas latent is cut into
model-sized square tiles that are denoised together and averaged, so that any size or aspect ratio is
generated at the resolution the model was trained on.

Tiling lives inside the one compiled loop: ``loop.loop_step`` asks ``tiled_eps`` for the canvas eps instead of
making one model call. Tiles are gathered by index arithmetic (wrap = modulo), evaluated ``batch`` at a time by
a ``lax.scan`` whose body traces the model once, and their eps are scatter-added with per-pixel weights and
normalised. Averaging eps and then taking one sampler step equals the official per-view DDIM step followed by
averaging x_{t-1}, because the update is affine in eps with per-step scalars. It also keeps multistep sampler
state (DPM-Solver) and sampler noise canvas-wide.

Coherence tricks, each switchable in ``Tiling``:

* full view: the whole canvas as one more view with weight 5 for steps ``i <= int(0.4 N)``. We follow the
  official step count (21 of 50 steps, i.e. steps 0-20), not exactly the paper's "first 40%". Two forms:

  - default (official code): the full canvas at full size (rolled by the column offset when wrapping), one
    model call as large as the whole canvas.
  - ``full_view_resize`` (the paper's wording): the canvas (and its conditioning) resized to one square tile
    (a 1:4 panorama is squeezed 4:1), the eps of that tile resized back to the canvas and added with the same
    weight; it costs one tile's compute. Down: ``nearest``, which keeps the noisy latent's noise i.i.d.
    N(0, 1), i.e. in distribution for the step's timestep, and inpainting masks binary (antialiased ``linear``
    shrinks the noise std to 0.42 at 4:1, as if the input were less noisy). Up: ``linear``, because the full
    view contributes layout, a low-frequency field; ``nearest`` would paste blocks of one eps value. Its eps
    cannot carry the per-pixel noise between the sampled pixels; the tiles supply that.
* random offset: per step, the grid moves by an offset in [0, stride) on each axis, drawn from the loop key,
  so the seed fixes it (the official code draws it from numpy's unseeded global RNG; see
  docs/official-differences.md). Without wrap a tile at 0 is added and the shifted positions are clamped to
  the canvas; duplicates get weight 0.
* border ramp: weights ``min(x + 0.5, T - 0.5 - x, r) / r`` along every axis that holds more than one tile
  (official: columns only for panoramas, both axes for upsampling), combined by ``min``.
* wrap: columns are circular (360° panoramas).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("ours", "upsample", "multidiffusion", "none")


@dataclass(frozen=True)
class Tiling:
    """How to tile, in latent pixels. Static and hashable: equal settings share one compiled loop.

    Defaults are the official panorama CLI (tile 64, stride 32, 8 tiles per call, ramp 8, full view 0.4 x 5,
    random offset) except ``wrap``, which the paper's 180° panoramas leave off.
    """

    tile: int = 64
    stride: int = 32
    batch: int = 8  # tiles per model call (official view_batch_size)
    wrap: bool = False
    random_offset: bool = True
    ramp: int = 8  # 0: constant weights
    full_view_fraction: float = 0.4  # 0: no full view
    full_view_weight: float = 5.0
    full_view_resize: bool = False  # True: the full view is the canvas resized to one tile (module docstring)

    @classmethod
    def preset(cls, mode: str, tile: int, **overrides) -> Tiling | None:
        """``ours`` (paper/official panorama, stride and ramp scaled to the tile), ``upsample`` (``ours``
        without offset or full view: the official upsample CLI and the paper's refinement),
        ``multidiffusion`` (Bar-Tal et al.: stride tile/8, uniform weights, no offset or full view: Table 2's
        baseline) or ``none`` (non-tiled). Overrides that are None keep the preset's value."""
        if mode not in MODES:
            raise ValueError(f"unknown tiling mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == "none":
            return None
        if mode in ("ours", "upsample"):
            base = cls(tile, max(tile // 2, 1), ramp=tile // 8)
            if mode == "upsample":
                base = dataclasses.replace(base, random_offset=False, full_view_fraction=0.0)
        else:
            base = cls(tile, max(tile // 8, 1), random_offset=False, ramp=0, full_view_fraction=0.0)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class TileGrid:
    """The static tile schedule of one canvas (latent ``height`` x ``width``): per-axis positions, the tile
    count and the number of model calls per step. Construction validates the settings."""

    tiling: Tiling
    height: int
    width: int

    def __post_init__(self):
        t = self.tiling
        if t.tile < 1 or t.batch < 1 or t.ramp < 0:
            raise ValueError(f"tile and batch must be >= 1 and ramp >= 0; got {t}")
        if not 1 <= t.stride <= t.tile:
            raise ValueError(f"tile stride {t.stride} must be between 1 and the tile size {t.tile}")
        if self.height < t.tile or self.width < t.tile:
            raise ValueError(
                f"the canvas ({self.height}x{self.width} latent) is smaller than a tile ({t.tile}x{t.tile}); "
                "use a larger size or no tiling"
            )
        if not 0.0 <= t.full_view_fraction <= 1.0:
            raise ValueError(f"full_view_fraction must be in [0, 1], got {t.full_view_fraction}")

    def _axis(self, length: int, wrap: bool) -> tuple[int, bool]:
        """(number of grid positions, whether a clamped shift needs the extra tile at 0) along one axis."""
        t = self.tiling
        if wrap:
            return math.ceil(length / t.stride), False
        shifted = t.random_offset and length > t.tile
        return math.ceil((length - t.tile) / t.stride) + 1 + shifted, shifted

    @property
    def num_tiles(self) -> int:
        return self._axis(self.height, False)[0] * self._axis(self.width, self.tiling.wrap)[0]

    @property
    def num_batches(self) -> int:
        """Model calls per step for the tiles (the full view is one more while active)."""
        return math.ceil(self.num_tiles / self.tiling.batch)

    def full_view_last_step(self, num_steps: int) -> int | None:
        """Last step (inclusive) with the full view, or None without one; official ``i <= int(N * 0.4)``."""
        t = self.tiling
        return int(num_steps * t.full_view_fraction) if t.full_view_fraction > 0 else None

    def offsets(self, key) -> jax.Array:
        """(row, column) grid offset for one step, in [0, stride); zeros without random offsets."""
        if not self.tiling.random_offset:
            return jnp.zeros(2, jnp.int32)
        return jax.random.randint(key, (2,), 0, self.tiling.stride)

    def _positions(self, length: int, wrap: bool, offset):
        """Tile starts along one axis and whether each one counts (clamped duplicates do not)."""
        t = self.tiling
        n, shifted = self._axis(length, wrap)
        k = jnp.arange(n - shifted) * t.stride + offset
        if wrap:
            return k % length, jnp.ones(n, bool)
        pos = jnp.minimum(k, length - t.tile)
        if shifted:
            pos = jnp.concatenate([jnp.zeros(1, pos.dtype), pos])
        return pos, jnp.concatenate([jnp.ones(1, bool), pos[1:] > pos[:-1]])

    def tiles(self, offset):
        """Tile rows, columns and weights-on flags, each (num_batches, batch); padding tiles are off."""
        rows, row_on = self._positions(self.height, False, offset[0])
        cols, col_on = self._positions(self.width, self.tiling.wrap, offset[1])
        grid = [a.reshape(-1) for a in jnp.meshgrid(rows, cols, indexing="ij")]
        on = (row_on[:, None] & col_on[None, :]).reshape(-1).astype(jnp.float32)
        pad = self.num_batches * self.tiling.batch - self.num_tiles
        return tuple(jnp.pad(a, (0, pad)).reshape(self.num_batches, self.tiling.batch) for a in (*grid, on))

    def weight(self) -> np.ndarray:
        """(tile, tile) aggregation weight: the border ramp on axes that hold several tiles, else 1."""
        t = self.tiling
        x = np.arange(t.tile)
        ramp = np.minimum(np.minimum(x + 0.5, t.tile - 0.5 - x), t.ramp) / t.ramp if t.ramp else np.ones(t.tile)
        ones = np.ones(t.tile)
        wy = ramp if self._axis(self.height, False)[0] > 1 else ones
        wx = ramp if self._axis(self.width, t.wrap)[0] > 1 else ones
        return np.minimum(wy[:, None], wx[None, :]).astype(np.float32)


def repeat_text(text, n: int, batch: int):
    """Text (G*B, L, D) ordered [uncond; cond] -> (G*n*B, L, D) for ``n`` tiles of ``batch`` canvases each
    (tile-major), so the guided batch [tiles; tiles] meets [uncond x n; cond x n]."""
    g = text.shape[0] // batch
    return jnp.broadcast_to(text.reshape(g, 1, batch, *text.shape[1:]), (g, n, batch, *text.shape[1:])).reshape(
        g * n * batch, *text.shape[1:]
    )


def _resize(a, height: int, width: int, method: str):
    """Resize the spatial axes of a (B, H, W, C) array."""
    return jax.image.resize(a, (a.shape[0], height, width, a.shape[-1]), method)


def aggregate(grid: TileGrid, eps_fn, canvas, text, offset, full_view=None):
    """Weighted sums over tiles (and the full view when ``full_view`` is a traced True): (value, count).

    ``canvas``: arrays (B, H, W, C) cropped alike (the latents, then the optional conditioning, None allowed);
    ``eps_fn(*crops, text)`` maps a batch of crops to eps.
    """
    t = grid.tiling
    x = canvas[0]
    b, c = x.shape[0], x.shape[-1]
    span = jnp.arange(t.tile)
    weight = jnp.asarray(grid.weight())
    tile_text = repeat_text(text, t.batch, b)

    def crop(a, ri, ci):  # (B, H, W, C) -> (n*B, T, T, C), tile-major
        return None if a is None else jnp.moveaxis(a[:, ri, ci], 1, 0).reshape(-1, t.tile, t.tile, a.shape[-1])

    def one_batch(acc, tiles):
        rows, cols, on = tiles
        ri = rows[:, None, None] + span[None, :, None]
        ci = (cols[:, None, None] + span[None, None, :]) % grid.width
        eps = eps_fn(*(crop(a, ri, ci) for a in canvas), tile_text)
        eps = jnp.moveaxis(eps.reshape(t.batch, b, t.tile, t.tile, c), 0, 1)
        w = on[:, None, None] * weight
        value, count = acc
        return (value.at[:, ri, ci].add(w[None, ..., None] * eps), count.at[ri, ci].add(w)), None

    acc = (jnp.zeros(x.shape, jnp.float32), jnp.zeros(x.shape[1:3], jnp.float32))
    acc, _ = jax.lax.scan(one_batch, acc, grid.tiles(offset))
    if full_view is None:
        return acc

    def add_full_view(acc):
        shift = offset[1] if t.wrap else 0
        view = [None if a is None else jnp.roll(a, -shift, axis=2) for a in canvas]
        if t.full_view_resize:
            view = [None if a is None else _resize(a, t.tile, t.tile, "nearest") for a in view]
            eps = _resize(eps_fn(*view, text), grid.height, grid.width, "linear")
        else:
            eps = eps_fn(*view, text)
        eps = jnp.roll(eps, shift, 2)
        value, count = acc
        return value + t.full_view_weight * eps, count + t.full_view_weight

    return jax.lax.cond(full_view, add_full_view, lambda acc: acc, acc)


def tiled_eps(grid: TileGrid, eps_fn, canvas, text, key, full_view=None):
    """The canvas eps: weighted average of tile (and full-view) eps; ``key`` draws this step's grid offset."""
    value, count = aggregate(grid, eps_fn, canvas, text, grid.offsets(key), full_view)
    return value / count[None, :, :, None]
