"""mesh: panorama geometry, closed seam, no faces across depth edges, export round trips, CLI errors."""

import numpy as np
import pytest
import trimesh
from PIL import Image

from jointnet_jax import io_utils, mesh, sample

H, W = 6, 12


def _rgb(h=H, w=W):
    return np.random.default_rng(0).random((h, w, 3))


def _columns(m, w=W):
    return m.faces % w  # vertex k is pixel (k // W, k % W)


@pytest.mark.parametrize("span", [360.0, 90.0])
def test_constant_depth_is_a_cylinder(span):
    m = mesh.panorama_to_mesh(_rgb(), np.full((H, W), 0.25), span=span)  # distance 1 / 0.25 = 4
    assert m.vertices.shape == (H * W, 3)
    np.testing.assert_allclose(np.hypot(m.vertices[:, 0], m.vertices[:, 2]), 4.0, rtol=1e-6)


def test_spherical_distance_is_along_the_ray():
    m = mesh.panorama_to_mesh(_rgb(), np.full((H, W), 0.5), projection="spherical")
    np.testing.assert_allclose(np.linalg.norm(m.vertices, axis=1), 2.0, rtol=1e-6)


def test_geometry_convention():
    m = mesh.panorama_to_mesh(_rgb(), np.full((H, W), 1.0))
    v = m.vertices.reshape(H, W, 3)
    assert v[0, 0, 1] > 0 > v[-1, 0, 1]  # top row is up (y up)
    np.testing.assert_allclose(v[:, :, 1], -v[::-1, :, 1], atol=1e-12)  # horizon in the middle
    assert np.all(np.einsum("ij,ij->i", m.triangles_center, m.face_normals) < 0)  # faces look at the camera


def test_scale_shift_near_far():
    d = mesh.inverse_depth_to_distance(np.array([0.0, 0.5, 1.0]), scale=2.0, shift=1.0)
    np.testing.assert_allclose(d, [1 / (2 / 65535 + 1), 0.5, 1 / 3])
    np.testing.assert_allclose(mesh.inverse_depth_to_distance(np.array([0.0, 1.0]), far=100.0), [100.0, 1.0])
    # A non-positive denominator is "beyond infinity": far, not a negative distance.
    assert mesh.inverse_depth_to_distance(np.array([0.5]), shift=-1.0, far=7.0)[0] == 7.0


def test_wrap_closes_the_seam():
    depth = np.full((H, W), 0.5)
    wrapped = mesh.panorama_to_mesh(_rgb(), depth)  # span 360 -> wrap by default
    open_ = mesh.panorama_to_mesh(_rgb(), depth, wrap=False)
    seam = lambda m: np.any(_columns(m) == 0, axis=1) & np.any(_columns(m) == W - 1, axis=1)
    assert len(wrapped.faces) == 2 * (H - 1) * W and seam(wrapped).sum() == 2 * (H - 1)
    assert len(open_.faces) == 2 * (H - 1) * (W - 1) and not seam(open_).any()
    assert not seam(mesh.panorama_to_mesh(_rgb(), depth, span=180.0)).any()  # partial span: open by default


def test_no_faces_across_a_depth_step():
    depth = np.full((H, W), 0.1)  # far: distance 10
    depth[:, : W // 2] = 1.0  # near: distance 1
    near = np.arange(H * W).reshape(H, W)[:, : W // 2].ravel()
    m = mesh.panorama_to_mesh(_rgb(), depth)
    on_near = np.isin(m.faces, near)
    assert not np.any(on_near.any(axis=1) & ~on_near.all(axis=1))  # no triangle mixes near and far
    assert on_near.all(axis=1).any() and (~on_near).all(axis=1).any()  # both sides keep their faces
    # Both edges (the middle and the closed seam) would be bridged without the filter.
    unfiltered = mesh.panorama_to_mesh(_rgb(), depth, max_depth_ratio=None)
    assert len(unfiltered.faces) == len(m.faces) + 2 * 2 * (H - 1)


@pytest.mark.parametrize("ext", ["glb", "ply"])
def test_export_round_trip(tmp_path, ext):
    m = mesh.panorama_to_mesh(_rgb(), np.full((H, W), 0.5))
    path = mesh.save_mesh(m, tmp_path / f"scene.{ext}")
    back = trimesh.load(path, process=False)
    if isinstance(back, trimesh.Scene):
        back = back.to_mesh()
    assert back.vertices.shape == m.vertices.shape and back.faces.shape == m.faces.shape
    np.testing.assert_allclose(back.vertices, m.vertices, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(back.visual.vertex_colors, m.visual.vertex_colors)
    np.testing.assert_array_equal(m.visual.vertex_colors[:, :3], np.round(_rgb().reshape(-1, 3) * 255))
    assert [p.name for p in tmp_path.iterdir()] == [f"scene.{ext}"]  # atomic: no temp file left


def test_unknown_mesh_format(tmp_path):
    with pytest.raises(ValueError, match=r"\.obj"):
        mesh.save_mesh(mesh.panorama_to_mesh(_rgb(), np.full((H, W), 0.5)), tmp_path / "scene.obj")


def test_cli_reads_16bit_depth(tmp_path):
    io_utils.write_png_rgb(tmp_path / "rgb.png", _rgb())
    Image.fromarray(np.full((H, W), 40000, np.uint16)).save(tmp_path / "depth.png")
    out = tmp_path / "scene.ply"
    assert (
        sample.main(
            ["mesh", "--rgb", str(tmp_path / "rgb.png"), "--depth", str(tmp_path / "depth.png"), "--out", str(out)]
        )
        == 0
    )
    v = trimesh.load(out, process=False).vertices
    # 40000/65535 read as 16-bit gives radius 65535/40000; an 8-bit (saturated) read would give 1.
    np.testing.assert_allclose(np.hypot(v[:, 0], v[:, 2]), 65535 / 40000, rtol=1e-5)


def test_size_mismatch_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="6x12.*5x12"):
        mesh.panorama_to_mesh(_rgb(), np.full((5, W), 0.5))
    io_utils.write_png_rgb(tmp_path / "rgb.png", _rgb())
    io_utils.write_png_depth16(tmp_path / "depth.png", np.full((H, W + 1), 0.5))
    argv = [
        "mesh",
        "--rgb",
        str(tmp_path / "rgb.png"),
        "--depth",
        str(tmp_path / "depth.png"),
        "--out",
        str(tmp_path / "s.glb"),
    ]
    assert sample.main(argv) == 1
    err = capsys.readouterr().err
    assert "rgb.png is 6x12" in err and "depth.png is 6x13" in err
    assert not (tmp_path / "s.glb").exists()


def test_too_tall_panorama_rejected():
    with pytest.raises(ValueError, match="vertically"):
        mesh.panorama_to_mesh(_rgb(12, 12), np.full((12, 12), 0.5))
