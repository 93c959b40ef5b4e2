"""RGBD panorama -> coloured triangle mesh (.glb / .ply), the official JointNet tool with its bugs fixed.

The depth input is what the panorama pipeline saves: normalised inverse depth ``v`` in [0, 1], near =
bright. As in the official tool, distance is ``d = 1 / (v * scale + shift)`` clipped to ``[near, far]``,
with ``v`` first clipped to ``[1/65535, 1]`` (the official tool clips 8-bit values to [1, 255] / 255; we
read 16-bit depth, so the smallest non-zero level is 1/65535).

Geometry, for an H x W panorama covering ``span`` degrees: ``LONG = span / 360 * 2 pi`` and
``LAT = LONG * H / W`` (square pixels). At pixel centres ``u = j + 0.5``, ``v = i + 0.5``::

    phi   = u / W * LONG                 (azimuth, grows with the column)
    theta = v / H * LAT - LAT / 2        (elevation below the horizon, grows with the row)

* ``cylindrical`` (official): ``d`` is the horizontal radius: ``x = d cos phi``, ``z = d sin phi``,
  ``y = d tan(-theta)``.
* ``spherical``: ``d`` is the distance along the viewing ray: ``x = d cos theta cos phi``,
  ``z = d cos theta sin phi``, ``y = -d sin theta``.

Both put the camera at the origin with y up (glTF's convention), and wind faces so their normals point
at the camera. Fixes over the official tool (docs/official-differences.md): the 360-degree seam is closed
(last column joins column 0), and triangles across depth discontinuities are dropped instead of stretched
into "rubber sheets".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from jointnet_jax.io_utils import atomic_write

# A triangle whose vertex distances differ by more than this factor spans a depth edge. 1.1 keeps smooth
# surfaces down to grazing angles: a floor seen at elevation theta changes distance per row by about
# 1 + dtheta / theta, which at 512 rows over 180 degrees stays below 1.1 until ~3.5 degrees from the
# horizon, where the floor is already > 15x the camera height away.
DEFAULT_MAX_DEPTH_RATIO = 1.1
PROJECTIONS = ("cylindrical", "spherical")
MESH_FORMATS = ("glb", "ply")


def inverse_depth_to_distance(
    v: np.ndarray, *, scale: float = 1.0, shift: float = 0.0, near: float = 1e-5, far: float = 1e5
) -> np.ndarray:
    """Normalised inverse depth in [0, 1] -> distance ``1 / (v * scale + shift)`` clipped to [near, far].

    A non-positive denominator means "beyond infinity" and maps to ``far`` rather than to a negative or
    infinite distance.
    """
    v = np.clip(np.asarray(v, dtype=np.float64), 1.0 / 65535.0, 1.0)
    denom = v * scale + shift
    with np.errstate(divide="ignore"):
        d = np.where(denom > 0, 1.0 / np.where(denom > 0, denom, 1.0), np.inf)
    return np.clip(d, near, far)


def panorama_vertices(distance: np.ndarray, *, span: float = 360.0, projection: str = "cylindrical"):
    """3-D point (H, W, 3) for every pixel of a distance map, per the module docstring's geometry."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if not 0.0 < span <= 360.0:
        raise ValueError(f"span must be in (0, 360] degrees, got {span}")
    h, w = distance.shape
    long = np.deg2rad(span)
    lat = long * h / w
    if lat > np.pi:
        raise ValueError(
            f"a {h}x{w} panorama over {span} degrees spans {np.rad2deg(lat):.1f} degrees vertically; "
            "more than 180 is not a panorama (is the image transposed?)"
        )
    phi = (np.arange(w) + 0.5) / w * long
    theta = (np.arange(h) + 0.5) / h * lat - lat / 2
    phi, theta = np.meshgrid(phi, theta)
    if projection == "cylindrical":
        radial, y = distance, distance * np.tan(-theta)
    else:
        radial, y = distance * np.cos(theta), -distance * np.sin(theta)
    return np.stack([radial * np.cos(phi), y, radial * np.sin(phi)], axis=-1)


def grid_faces(h: int, w: int, *, wrap: bool) -> np.ndarray:
    """Two triangles per pixel quad, (i,j),(i+1,j),(i+1,j+1) and (i,j),(i+1,j+1),(i,j+1), as (F, 3) int.

    With ``wrap`` the column after W-1 is column 0, closing a 360-degree panorama's seam.
    """
    idx = np.arange(h * w).reshape(h, w)
    right = np.roll(idx, -1, axis=1) if wrap else idx[:, 1:]
    left = idx if wrap else idx[:, :-1]
    a, b = left[:-1], left[1:]  # (i, j), (i+1, j)
    c, d = right[1:], right[:-1]  # (i+1, j+1), (i, j+1)
    tris = np.stack([np.stack([a, b, c], -1), np.stack([a, c, d], -1)], axis=2)
    return tris.reshape(-1, 3)


def panorama_to_mesh(
    rgb: np.ndarray,
    depth: np.ndarray,
    *,
    span: float = 360.0,
    wrap: bool | None = None,
    scale: float = 1.0,
    shift: float = 0.0,
    near: float = 1e-5,
    far: float = 1e5,
    projection: str = "cylindrical",
    max_depth_ratio: float | None = DEFAULT_MAX_DEPTH_RATIO,
) -> trimesh.Trimesh:
    """Vertex-coloured mesh of an RGBD panorama, one vertex per pixel.

    ``rgb``: float HWC in [0, 1]. ``depth``: normalised inverse depth HW (or HW1) in [0, 1]. ``wrap``
    defaults to ``span == 360``. ``max_depth_ratio``: drop triangles whose largest vertex distance exceeds
    the smallest by more than this factor (``None`` keeps all). Vertices are never removed, so vertex ``k``
    is pixel ``(k // W, k % W)`` even where no face uses it.
    """
    rgb, depth = np.asarray(rgb), np.asarray(depth)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or depth.ndim != 2:
        raise ValueError(f"need rgb HxWx3 and depth HxW, got rgb {rgb.shape} and depth {depth.shape}")
    if rgb.shape[:2] != depth.shape:
        raise ValueError(f"rgb is {rgb.shape[0]}x{rgb.shape[1]} but depth is {depth.shape[0]}x{depth.shape[1]} (HxW)")
    if not np.all(np.isfinite(depth)):
        raise ValueError("depth contains non-finite values")
    if max_depth_ratio is not None and not max_depth_ratio >= 1.0:
        raise ValueError(f"max_depth_ratio must be >= 1 (or None), got {max_depth_ratio}")
    h, w = depth.shape
    if h < 2 or w < 2:
        raise ValueError(f"panorama must be at least 2x2, got {h}x{w}")
    wrap = span == 360.0 if wrap is None else wrap

    distance = inverse_depth_to_distance(depth, scale=scale, shift=shift, near=near, far=far)
    vertices = panorama_vertices(distance, span=span, projection=projection).reshape(-1, 3)
    faces = grid_faces(h, w, wrap=wrap)
    if max_depth_ratio is not None:
        tri_d = distance.reshape(-1)[faces]
        faces = faces[tri_d.max(axis=1) <= max_depth_ratio * tri_d.min(axis=1)]
    colors = np.round(np.clip(rgb.reshape(-1, 3), 0.0, 1.0) * 255).astype(np.uint8)
    colors = np.concatenate([colors, np.full((h * w, 1), 255, np.uint8)], axis=1)
    return trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=colors, process=False)


def save_mesh(mesh: trimesh.Trimesh, path) -> Path:
    """Export to ``.glb`` or ``.ply`` (chosen by the extension), written atomically."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in MESH_FORMATS:
        raise ValueError(f"{path}: mesh format must be one of {['.' + f for f in MESH_FORMATS]}")
    data = mesh.export(file_type=fmt)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path
