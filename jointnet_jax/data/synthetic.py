"""A tiny seeded synthetic RGB-D world: spheres and boxes on a floor in front of a wall.

Scenes are ray cast with numpy (vectorised over pixels, exact ray-sphere, ray-box slab and ray-plane
intersections) so depth is exact rather than estimated, which makes the data useful for checking
that a joint RGB + depth model learns geometry, and cheap enough (a few ms per 64x64 image) to feed a
CPU demo with thousands of examples.

Conventions: world y is up and the floor is the plane y = 0. The camera looks along its forward axis
f; pixel (i, j) casts the ray ``f + sx * r + sy * u`` whose forward component is exactly 1, so the ray
parameter t at a hit *is* the z-depth (distance along the camera's optical axis, not the Euclidean
distance to the camera centre). Normals are reported in camera space (x right, y up, z towards the
camera). Shading is Lambert + Phong (shiny materials) with hard shadows from 1-2 point lights.

CLI: ``python -m jointnet_jax.data.synthetic --out DIR --num N --size 64 [--seed S] [--num-shards K]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

from jointnet_jax.data import records

PALETTE = {
    "red": (0.80, 0.10, 0.10),
    "orange": (0.90, 0.45, 0.08),
    "yellow": (0.90, 0.80, 0.15),
    "green": (0.15, 0.65, 0.20),
    "cyan": (0.15, 0.70, 0.75),
    "blue": (0.12, 0.25, 0.85),
    "purple": (0.50, 0.18, 0.70),
    "pink": (0.95, 0.50, 0.65),
    "black": (0.06, 0.06, 0.06),
    "white": (0.92, 0.92, 0.92),
}
FLOORS = {"wooden": (0.55, 0.35, 0.18), "tiled": (0.75, 0.75, 0.72), "grey": (0.45, 0.45, 0.47)}
WALLS = {"white": (0.85, 0.85, 0.82), "beige": (0.82, 0.74, 0.60), "light blue": (0.60, 0.72, 0.85)}
SKY = np.array((0.55, 0.70, 0.90))
AMBIENT = 0.25
MATERIALS = {"matte": (0.0, 1.0), "shiny": (0.6, 48.0)}  # (specular weight, Phong exponent)
_EPS = 1e-6
_HALF_PI = math.pi / 2


@dataclasses.dataclass(frozen=True)
class Camera:
    position: tuple[float, float, float]
    yaw: float = 0.0  # radians, about world y; positive turns right (towards +x)
    pitch: float = 0.0  # radians; positive looks up
    fov: float = math.radians(60.0)  # full field of view of the (square) image

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Right, up and forward unit vectors in world coordinates."""
        cy, sy, cp, sp = math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)
        forward = np.array([sy * cp, sp, cy * cp])
        right = np.array([cy, 0.0, -sy])
        return right, np.cross(forward, right), forward


@dataclasses.dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    colour: str
    material: str = "matte"

    @property
    def noun(self) -> str:
        return "sphere"


@dataclasses.dataclass(frozen=True)
class Box:
    center: tuple[float, float, float]
    half_size: tuple[float, float, float]
    colour: str
    material: str = "matte"
    yaw: float = 0.0  # rotation about the vertical axis through the centre

    @property
    def noun(self) -> str:
        return "cube" if len(set(self.half_size)) == 1 else "box"


@dataclasses.dataclass(frozen=True)
class Light:
    position: tuple[float, float, float]
    intensity: float


@dataclasses.dataclass(frozen=True)
class Scene:
    camera: Camera
    objects: tuple[Sphere | Box, ...] = ()
    lights: tuple[Light, ...] = (Light((0.0, 5.0, 0.0), 0.8),)
    floor: str | None = "wooden"  # key of FLOORS; the plane y = 0
    wall: str | None = "white"  # key of WALLS; the plane z = wall_z facing the camera
    wall_z: float = 8.0


def _pixel_rays(camera: Camera, size: int) -> np.ndarray:
    """(size*size, 3) ray directions whose component along the forward axis is exactly 1."""
    right, up, forward = camera.basis()
    half = math.tan(camera.fov / 2.0)
    coords = ((np.arange(size) + 0.5) / size * 2.0 - 1.0) * half
    sx, sy = np.meshgrid(coords, -coords)  # rows go down the image, so up is -row
    return forward + sx.reshape(-1, 1) * right + sy.reshape(-1, 1) * up


def _hit_sphere(origin: np.ndarray, dirs: np.ndarray, sphere: Sphere, normals: bool = True):
    """Nearest t > eps along ``origin + t * dirs`` (inf on a miss) and the outward unit normal there."""
    center = np.asarray(sphere.center)
    oc = np.atleast_2d(origin - center)
    a = np.einsum("ij,ij->i", dirs, dirs)
    b = np.einsum("ij,ij->i", oc, dirs) if len(oc) > 1 else dirs @ oc[0]
    c = np.einsum("ij,ij->i", oc, oc) - sphere.radius**2
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    near, far = (-b - root) / a, (-b + root) / a
    t = np.where(near > _EPS, near, far)
    t = np.where((disc >= 0.0) & (t > _EPS), t, np.inf)
    if not normals:
        return t, None
    points = origin + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
    return t, (points - center) / sphere.radius


def _hit_box(origin: np.ndarray, dirs: np.ndarray, box: Box, normals: bool = True):
    """Slab test in the box frame (rotated by ``box.yaw``); same outputs as :func:`_hit_sphere`."""
    cos, sin = math.cos(box.yaw), math.sin(box.yaw)
    to_local = np.array([[cos, 0.0, -sin], [0.0, 1.0, 0.0], [sin, 0.0, cos]])  # rows: box axes in world
    local_origin = ((np.atleast_2d(origin) - np.asarray(box.center)) @ to_local.T).T
    local_dirs = (dirs @ to_local.T).T
    t_enter = np.full(len(dirs), -np.inf)
    t_exit = np.full(len(dirs), np.inf)
    axis = np.zeros(len(dirs), dtype=np.int64)
    for k, half in enumerate(box.half_size):  # per-axis slabs; columns beat axis reductions here
        d = np.where(np.abs(local_dirs[k]) < 1e-12, 1e-12, local_dirs[k])
        t1, t2 = (-half - local_origin[k]) / d, (half - local_origin[k]) / d
        near = np.minimum(t1, t2)
        axis = np.where(near > t_enter, k, axis)
        t_enter = np.maximum(t_enter, near)
        t_exit = np.minimum(t_exit, np.maximum(t1, t2))
    # Rays never start inside a box (the camera and shadow origins lie outside), so the hit is the
    # entry face.
    t = np.where((t_exit >= t_enter) & (t_enter > _EPS), t_enter, np.inf)
    if not normals:
        return t, None
    rows = np.arange(len(dirs))
    local_normal = np.zeros((len(dirs), 3))
    local_normal[rows, axis] = -np.sign(local_dirs[axis, rows])
    return t, local_normal @ to_local


def _hit_plane(origin, dirs, normal, offset) -> np.ndarray:
    """t where ``normal . p = offset`` is crossed (inf when parallel or behind the origin)."""
    normal = np.asarray(normal, dtype=np.float64)
    denom = dirs @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (offset - np.atleast_2d(origin) @ normal) / denom
    return np.where(np.isfinite(t) & (t > _EPS), t, np.inf)


def _hit_objects(origin, dirs, objects) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest object hit: (t, normal, object index or -1)."""
    best_t = np.full(len(dirs), np.inf)
    best_normal = np.zeros_like(dirs)
    best_id = np.full(len(dirs), -1)
    for index, obj in enumerate(objects):
        t, normal = (_hit_sphere if isinstance(obj, Sphere) else _hit_box)(origin, dirs, obj)
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        best_normal = np.where(closer[:, None], normal, best_normal)
        best_id = np.where(closer, index, best_id)
    return best_t, best_normal, best_id


@dataclasses.dataclass
class RenderBuffers:
    """Per-pixel outputs of :func:`render_buffers`.

    ``object_id`` is the index into ``scene.objects``, -1 for the floor, -2 the wall, -3 no hit.
    """

    rgb: np.ndarray  # uint8 HxWx3 (sRGB)
    depth: np.ndarray  # float64 HxW z-depth, inf where nothing is hit
    normal: np.ndarray  # float32 HxWx3 camera-space unit normals (zero where nothing is hit)
    object_id: np.ndarray  # int HxW


def _floor_albedo(kind: str, points: np.ndarray) -> np.ndarray:
    """Procedural floor texture: planks for wood, a checkerboard for tiles."""
    base = np.asarray(FLOORS[kind])
    x, z = points[:, 0], points[:, 2]
    if kind == "wooden":
        plank = np.floor(x / 0.4)
        grain = 0.85 + 0.08 * np.sin(z * 6.0 + plank * 1.7) + 0.07 * (plank % 2)
        return base * grain[:, None]
    if kind == "tiled":
        checker = (np.floor(x / 0.6) + np.floor(z / 0.6)) % 2
        return base * (0.75 + 0.25 * checker)[:, None]
    return np.broadcast_to(base, points.shape)


def render_buffers(scene: Scene, size: int, shade: bool = True) -> RenderBuffers:
    """Ray cast ``scene`` at ``size`` x ``size``; ``shade=False`` skips lighting (geometry only)."""
    origin = np.asarray(scene.camera.position, dtype=np.float64)
    dirs = _pixel_rays(scene.camera, size)
    t, normal, ids = _hit_objects(origin, dirs, scene.objects)
    planes = []
    if scene.floor is not None:
        planes.append(((0.0, 1.0, 0.0), 0.0, -1))
    if scene.wall is not None:
        planes.append(((0.0, 0.0, -1.0), -scene.wall_z, -2))
    for plane_normal, offset, plane_id in planes:
        t_plane = _hit_plane(origin, dirs, plane_normal, offset)
        closer = t_plane < t
        t = np.where(closer, t_plane, t)
        normal = np.where(closer[:, None], np.asarray(plane_normal), normal)
        ids = np.where(closer, plane_id, ids)
    ids = np.where(np.isfinite(t), ids, -3)
    right, up, forward = scene.camera.basis()
    camera_normal = (normal @ np.stack([right, up, -forward], axis=1)).astype(np.float32)
    rgb = _shade(scene, origin, dirs, t, normal, ids) if shade else np.zeros((len(t), 3))
    srgb = np.round(np.clip(rgb, 0.0, 1.0) ** (1.0 / 2.2) * 255.0).astype(np.uint8)
    return RenderBuffers(
        rgb=srgb.reshape(size, size, 3),
        depth=t.reshape(size, size),
        normal=camera_normal.reshape(size, size, 3),
        object_id=ids.reshape(size, size),
    )


def _shade(scene, origin, dirs, t, normal, ids) -> np.ndarray:
    """Linear RGB: ambient + Lambert + Phong highlights, with hard shadows cast by the objects."""
    hit = np.isfinite(t)
    points = origin + np.where(hit, t, 0.0)[:, None] * dirs
    albedo = np.zeros_like(dirs)
    specular = np.zeros(len(dirs))
    exponent = np.ones(len(dirs))
    for index, obj in enumerate(scene.objects):
        mask = ids == index
        albedo[mask] = PALETTE[obj.colour]
        specular[mask], exponent[mask] = MATERIALS[obj.material]
    if scene.floor is not None:
        albedo[ids == -1] = _floor_albedo(scene.floor, points[ids == -1])
    if scene.wall is not None:
        albedo[ids == -2] = WALLS[scene.wall]
    view = -dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    light_sum = np.full(len(dirs), AMBIENT)
    highlight = np.zeros(len(dirs))
    shadow_origin = points + normal * 1e-4
    for light in scene.lights:
        to_light = np.asarray(light.position) - shadow_origin
        distance = np.linalg.norm(to_light, axis=1, keepdims=True)
        direction = to_light / distance
        lambert = np.maximum(np.einsum("ij,ij->i", normal, direction), 0.0)
        blocked = np.full(len(dirs), np.inf)
        for obj in scene.objects:
            blocked = np.minimum(
                blocked,
                (_hit_sphere if isinstance(obj, Sphere) else _hit_box)(shadow_origin, to_light, obj, normals=False)[0],
            )
        lit = light.intensity * (blocked >= 1.0) * (lambert > 0.0)
        reflected = 2.0 * lambert[:, None] * normal - direction
        phong = np.maximum(np.einsum("ij,ij->i", reflected, view), 0.0) ** exponent
        light_sum += lit * lambert
        highlight += lit * specular * phong
    colour = albedo * light_sum[:, None] + highlight[:, None]
    return np.where(hit[:, None], colour, SKY)


def render_scene(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (size, size, 3) and exact float64 z-depth (size, size) of ``scene``."""
    buffers = render_buffers(scene, size)
    return buffers.rgb, buffers.depth


def _random_object(rng: np.random.Generator, colour: str) -> Sphere | Box:
    x, z = rng.uniform(-1.6, 1.6), rng.uniform(2.8, 6.0)
    material = str(rng.choice(list(MATERIALS)))
    if rng.random() < 0.5:
        radius = rng.uniform(0.3, 0.7)
        return Sphere((x, radius, z), radius, colour, material)
    half = rng.uniform(0.25, 0.6, size=3) if rng.random() < 0.5 else np.full(3, rng.uniform(0.25, 0.55))
    return Box((x, half[1], z), tuple(half.tolist()), colour, material, yaw=rng.uniform(-0.8, 0.8))


def _footprint(obj: Sphere | Box) -> float:
    return obj.radius if isinstance(obj, Sphere) else math.hypot(obj.half_size[0], obj.half_size[2])


def random_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    """Sample a scene with 1..max_objects non-overlapping objects, each clearly visible.

    Visibility (at least 2% of a 32x32 geometry-only render per object) is checked at a fixed
    resolution so the scene, and hence the caption, does not depend on the output image size.
    """
    while True:
        camera = Camera(
            position=(rng.uniform(-0.4, 0.4), rng.uniform(1.0, 1.9), rng.uniform(-0.4, 0.4)),
            yaw=math.radians(rng.uniform(-15.0, 15.0)),
            pitch=math.radians(rng.uniform(-28.0, -10.0)),
            fov=math.radians(rng.uniform(50.0, 65.0)),
        )
        colours = rng.choice(list(PALETTE), size=int(rng.integers(1, max_objects + 1)), replace=False)
        objects: list[Sphere | Box] = []
        for colour in colours:
            for _ in range(20):
                candidate = _random_object(rng, str(colour))
                if all(
                    math.dist(candidate.center[::2], other.center[::2])
                    > _footprint(candidate) + _footprint(other) + 0.1
                    for other in objects
                ):
                    objects.append(candidate)
                    break
        lights = tuple(
            Light((rng.uniform(-3.0, 3.0), rng.uniform(3.0, 6.0), rng.uniform(-1.0, 3.0)), intensity)
            for intensity in ((0.85,) if rng.random() < 0.5 else (0.55, 0.35))
        )
        scene = Scene(
            camera=camera,
            objects=tuple(objects),
            lights=lights,
            floor=str(rng.choice(list(FLOORS))),
            wall=str(rng.choice(list(WALLS))),
            wall_z=rng.uniform(7.5, 9.0),
        )
        ids = render_buffers(scene, 32, shade=False).object_id
        if all(np.count_nonzero(ids == index) >= 0.02 * ids.size for index in range(len(objects))):
            return scene


def _phrase(obj: Sphere | Box) -> str:
    words = ("shiny " if obj.material == "shiny" else "") + f"{obj.colour} {obj.noun}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene) -> str:
    """Describe the objects near to far with the relation between each consecutive pair.

    e.g. "a red sphere in front of a shiny blue box on a wooden floor in front of a white wall".
    """
    right, _, forward = scene.camera.basis()
    position = np.asarray(scene.camera.position)

    def camera_xz(obj):
        offset = np.asarray(obj.center) - position
        return float(offset @ right), float(offset @ forward)

    ordered = sorted(scene.objects, key=lambda obj: camera_xz(obj)[1])
    parts = [_phrase(ordered[0])] if ordered else []
    for near, far in zip(ordered, ordered[1:], strict=False):
        (x_near, z_near), (x_far, z_far) = camera_xz(near), camera_xz(far)
        if z_far - z_near > abs(x_far - x_near):
            relation = "in front of"
        else:
            relation = "to the left of" if x_near < x_far else "to the right of"
        parts.append(f"{relation} {_phrase(far)}")
    if scene.floor is not None:
        parts.append(f"on a {scene.floor} floor")
    if scene.wall is not None:
        parts.append(f"in front of a {scene.wall} wall")
    return " ".join(parts) if parts else "an empty room"


def scene_buffers(index: int, size: int = 64, *, seed: int = 0) -> tuple[Scene, RenderBuffers]:
    """Scene ``index`` of the dataset with base ``seed`` and its exact buffers (metric z-depth included,
    which evaluation needs and the records, holding normalised inverse depth, do not keep)."""
    scene = random_scene(np.random.default_rng([seed, index]))
    return scene, render_buffers(scene, size)


def make_example(index: int, size: int = 64, *, seed: int = 0) -> records.Example:
    """Example ``index`` of the synthetic dataset with base ``seed``; fully deterministic."""
    scene, buffers = scene_buffers(index, size, seed=seed)
    normal = np.round((np.clip(buffers.normal, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return records.Example(
        key=f"synthetic-{seed}-{index:08d}",
        caption=caption(scene),
        image=buffers.rgb,
        depth=records.normalize_inverse_depth(buffers.depth),
        normal=normal,
        watermark=0.0,
        source="synthetic",
    )


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder for the record shards")
    parser.add_argument("--num", type=int, required=True, help="number of examples")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="base seed; example i uses (seed, i)")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--prefix", default="synthetic", help="shard file-name prefix")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of this prefix")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    examples = (make_example(i, args.size, seed=args.seed) for i in range(args.num))
    paths = records.write_shards(
        tqdm(examples, total=args.num, desc="rendering", unit="img"),
        args.out,
        args.prefix,
        num_shards=args.num_shards,
        overwrite=args.overwrite,
    )
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main()
