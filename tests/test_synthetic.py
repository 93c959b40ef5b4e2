"""Synthetic world: determinism, exact analytic depth, captions and the CLI."""

import math
import re
from collections import Counter

import numpy as np
import pytest

from jointnet_jax.data import records, synthetic
from jointnet_jax.data.synthetic import Box, Camera, Scene, Sphere


def _pixel_coords(size, fov):
    """Independent re-derivation of the image-plane offsets of pixel centres."""
    return (np.arange(size) + 0.5) / size * 2.0 - 1.0, math.tan(fov / 2.0)


def test_same_seed_same_bytes_and_different_seeds_differ():
    first = records.encode_example(synthetic.make_example(3, 32, seed=7))
    assert first == records.encode_example(synthetic.make_example(3, 32, seed=7))
    assert first != records.encode_example(synthetic.make_example(3, 32, seed=8))
    assert first != records.encode_example(synthetic.make_example(4, 32, seed=7))


def test_wall_depth_is_exact_z_depth_even_when_the_camera_turns():
    size, fov, yaw = 17, math.radians(60.0), math.radians(20.0)
    straight = Scene(camera=Camera((0.0, 0.0, 0.0), fov=fov), floor=None, wall_z=3.0)
    np.testing.assert_allclose(synthetic.render_scene(straight, size)[1], 3.0, rtol=0, atol=1e-12)
    turned = Scene(camera=Camera((0.0, 0.0, 0.0), yaw=yaw, fov=fov), floor=None, wall_z=3.0)
    u, half = _pixel_coords(size, fov)
    # Ray = forward + sx * right with forward = (sin, 0, cos), right = (cos, 0, -sin): wall z = 3 at t below.
    z_component = math.cos(yaw) - u * half * math.sin(yaw)
    expected = np.broadcast_to(3.0 / z_component, (size, size))
    np.testing.assert_allclose(synthetic.render_scene(turned, size)[1], expected, rtol=1e-12)


def test_floor_depth_matches_analytic_plane_intersection():
    size, fov, height = 16, math.radians(50.0), 1.5
    scene = Scene(camera=Camera((0.0, height, 0.0), fov=fov), floor="grey", wall=None)
    depth = synthetic.render_scene(scene, size)[1]
    v, half = _pixel_coords(size, fov)
    below = v > 0  # rows under the horizon look down by v * tan(fov / 2) per unit forward
    np.testing.assert_allclose(depth[below], np.repeat(height / (v[below] * half), size).reshape(-1, size))
    assert np.all(np.isinf(depth[~below]))


def test_sphere_depth_matches_ray_sphere_solution():
    size, fov, center, radius = 33, math.radians(40.0), np.array([0.3, -0.2, 5.0]), 1.2
    sphere = Sphere(tuple(center), radius, "red")
    scene = Scene(camera=Camera((0.0, 0.0, 0.0), fov=fov), objects=(sphere,), floor=None, wall=None)
    depth = synthetic.render_scene(scene, size)[1]
    u, half = _pixel_coords(size, fov)
    for i, j in [(16, 16), (14, 18), (20, 15), (10, 17)]:
        direction = np.array([u[j] * half, -u[i] * half, 1.0])
        unit = direction / np.linalg.norm(direction)
        along = unit @ center
        distance = along - math.sqrt(along**2 - (center @ center - radius**2))
        assert depth[i, j] == pytest.approx(distance * unit[2], rel=1e-12)
    assert np.isinf(depth[0, 0])


def test_box_front_face_has_constant_z_depth_and_sides_are_farther():
    box = Box((0.0, 0.0, 5.0), (1.0, 1.0, 1.0), "blue")
    scene = Scene(camera=Camera((0.0, 0.0, 0.0)), objects=(box,), floor=None, wall=None)
    buffers = synthetic.render_buffers(scene, 31)
    front = buffers.object_id == 0
    assert front.sum() > 100
    np.testing.assert_allclose(buffers.depth[front], 4.0, rtol=1e-12)
    np.testing.assert_allclose(buffers.normal[front], [[0.0, 0.0, 1.0]] * int(front.sum()))
    assert np.all(np.isinf(buffers.depth[~front]))


def test_captions_name_exactly_the_visible_objects():
    for index in range(12):
        scene = synthetic.random_scene(np.random.default_rng([0, index]))
        example = synthetic.make_example(index, 32)
        assert example.caption == synthetic.caption(scene)
        named = Counter(re.findall(r"\ban? (?:shiny )?(\w+) (sphere|cube|box)\b", example.caption))
        assert named == Counter((obj.colour, obj.noun) for obj in scene.objects)
        ids = synthetic.render_buffers(scene, 32, shade=False).object_id
        assert all(np.any(ids == k) for k in range(len(scene.objects)))
        assert f"on a {scene.floor} floor" in example.caption


def test_example_fields_and_inverse_depth_convention():
    example = synthetic.make_example(0, 24)
    assert example.image.shape == (24, 24, 3) and example.image.dtype == np.uint8
    assert example.depth.dtype == np.float32 and example.depth.min() == 0.0 and example.depth.max() == 1.0
    assert example.normal.shape == (24, 24, 3) and example.source == "synthetic"
    depth = np.array([[1.0, 2.0], [4.0, np.inf]])
    np.testing.assert_allclose(records.normalize_inverse_depth(depth), [[1.0, 0.5], [0.25, 0.0]])


def test_cli_writes_readable_shards(tmp_path, capsys):
    paths = synthetic.main(["--out", str(tmp_path), "--num", "5", "--size", "16", "--num-shards", "2"])
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "synthetic-00000-of-00002.array_record",
        "synthetic-00001-of-00002.array_record",
    ]
    reader = records.RecordReader(tmp_path)
    assert sorted(example.key for example in reader) == [f"synthetic-0-{i:08d}" for i in range(5)]
    assert reader[0].image.shape == (16, 16, 3)
