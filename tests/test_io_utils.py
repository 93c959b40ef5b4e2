"""io_utils: bit-depth conventions, clear errors for bad files, atomic writes."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jointnet_jax import io_utils


def test_rgb_8bit_round_trip(tmp_path):
    rgb = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    io_utils.write_png_rgb(tmp_path / "a.png", rgb)
    back = io_utils.read_image(tmp_path / "a.png")
    assert back.dtype == np.float32 and back.shape == (5, 7, 3)
    np.testing.assert_array_equal(back, (np.round(rgb * 255) / 255).astype(np.float32))


def test_depth_16bit_round_trip(tmp_path):
    depth = np.random.default_rng(0).random((6, 4))
    io_utils.write_png_depth16(tmp_path / "d.png", depth)
    with Image.open(tmp_path / "d.png") as img:
        assert img.mode.startswith("I")  # really 16-bit, not 8-bit
    back = io_utils.read_depth(tmp_path / "d.png")
    assert back.dtype == np.float32 and back.shape == (6, 4)
    np.testing.assert_allclose(back, depth, atol=0.5 / 65535 + 1e-7)


def test_16bit_value_not_saturated(tmp_path):
    Image.fromarray(np.full((2, 3), 40000, np.uint16)).save(tmp_path / "d.png")
    np.testing.assert_allclose(io_utils.read_depth(tmp_path / "d.png"), 40000 / 65535, rtol=1e-6)


def test_8bit_and_colour_depth(tmp_path):
    """8-bit grey by 255; an RGB depth PNG with equal channels is its grey, one with unequal channels is refused
    (reading channel 0 of a colour image would silently be wrong)."""
    Image.fromarray(np.array([[0, 51, 255]], np.uint8)).save(tmp_path / "g.png")
    np.testing.assert_allclose(io_utils.read_depth(tmp_path / "g.png"), [[0, 0.2, 1]], atol=1e-7)
    grey = np.repeat(np.array([[[102], [255]]], np.uint8), 3, axis=-1)
    Image.fromarray(grey).save(tmp_path / "c.png")
    np.testing.assert_allclose(io_utils.read_depth(tmp_path / "c.png"), [[0.4, 1.0]], atol=1e-7)
    rgb = grey.copy()
    rgb[..., 1] = 7
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match=r"colour.png: a depth map must have one channel .* channels differ"):
        io_utils.read_depth(tmp_path / "colour.png")


def test_16bit_rgb_input_is_scaled_by_its_range(tmp_path):
    """The one image reader: a 16-bit grey image is read by 65535 (and as 8 bits by the labelling job's
    decoder), not clipped at 255."""
    ramp = np.linspace(0, 65535, 11).round().astype(np.uint16)[None, :]
    Image.fromarray(ramp).save(tmp_path / "r.png")
    np.testing.assert_allclose(io_utils.read_image(tmp_path / "r.png")[..., 0], ramp / 65535, atol=1e-7)
    rgb8 = io_utils.decode_rgb8((tmp_path / "r.png").read_bytes(), "r.png")
    np.testing.assert_array_equal(rgb8[..., 1], np.round(ramp / 65535 * 255).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with EXIF orientation 6 (rotate 90 degrees clockwise) is read upright."""
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0, 0] = 255  # top-left red as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    upright = io_utils.read_image(tmp_path / "phone.png")
    assert upright.shape == (3, 2, 3)
    assert upright[0, 1, 0] == 1.0 and upright[..., 0].sum() == 1.0  # the stored top-left is now top-right


def test_npy_depth(tmp_path):
    values = np.random.default_rng(0).random((3, 4, 1)).astype(np.float32)
    np.save(tmp_path / "ok.npy", values)
    back = io_utils.read_depth(tmp_path / "ok.npy")
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, values[..., 0])  # float maps are used as stored, HW1 squeezed
    np.save(tmp_path / "f64.npy", values[..., 0].astype(np.float64))
    np.testing.assert_allclose(io_utils.read_depth(tmp_path / "f64.npy"), values[..., 0], rtol=1e-7)
    np.save(tmp_path / "int.npy", np.zeros((3, 4), np.uint8))
    with pytest.raises(ValueError, match=r"int\.npy.*floating point"):
        io_utils.read_depth(tmp_path / "int.npy")
    np.save(tmp_path / "high.npy", np.full((3, 4), 1.5))
    with pytest.raises(ValueError, match=r"high\.npy.*\[0, 1\]"):
        io_utils.read_depth(tmp_path / "high.npy")
    np.save(tmp_path / "nan.npy", np.array([[0.5, np.nan]]))
    with pytest.raises(ValueError, match="non-finite"):
        io_utils.read_depth(tmp_path / "nan.npy")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.npy"):
        io_utils.read_depth(tmp_path / "empty.npy")


def test_mask_binarised(tmp_path):
    Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(io_utils.read_mask(tmp_path / "m.png"), [[0, 0, 1, 1]])


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    for reader in (io_utils.read_image, io_utils.read_depth, io_utils.read_mask):
        with pytest.raises(ValueError, match="broken.png"):
            reader(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        io_utils.read_image(tmp_path / "missing.png")


def test_truncated_png_is_value_error(tmp_path):
    io_utils.write_png_rgb(tmp_path / "full.png", np.random.default_rng(0).random((64, 64, 3)))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        io_utils.read_image(tmp_path / "cut.png")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io_utils.atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # temp file cleaned up

    io_utils.write_png_depth16(target, np.zeros((2, 2)))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    assert io_utils.read_depth(target).shape == (2, 2)


def test_depth_color_preview(tmp_path):
    io_utils.write_depth_color(tmp_path / "c.png", np.array([[0.0, 1.0]]))
    rgb = io_utils.read_image(tmp_path / "c.png")
    assert rgb.shape == (1, 2, 3)
    far, near = rgb[0, 0], rgb[0, 1]
    assert far[2] > far[0] and near[0] > near[2]  # far blue-ish, near (bright inverse depth) red-ish
    with pytest.raises(ValueError, match="non-finite"):
        io_utils.write_depth_color(tmp_path / "n.png", np.array([[np.nan]]))


def test_list_images_takes_a_file_a_folder_or_a_glob_and_image_size_is_as_displayed(tmp_path, monkeypatch):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 40 wide and 30 high, displayed 30 wide and 40 high
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "b.jpg", exif=exif)
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert io_utils.list_images(tmp_path) == [tmp_path / "a.png", tmp_path / "b.jpg"]
    assert io_utils.list_images(tmp_path / "b.jpg") == [tmp_path / "b.jpg"]
    assert io_utils.list_images(str(tmp_path / "*.png")) == [tmp_path / "a.png"]
    monkeypatch.chdir(tmp_path)
    assert io_utils.list_images("*.jpg") == [Path("b.jpg")]
    assert io_utils.image_size(tmp_path / "b.jpg") == (40, 30) and io_utils.image_size(tmp_path / "a.png") == (5, 7)
    for missing in (tmp_path / "none", str(tmp_path / "*.webp")):
        with pytest.raises(FileNotFoundError, match="no such image file, folder or matching files"):
            io_utils.list_images(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        io_utils.list_images(tmp_path / "empty")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        io_utils.image_size(tmp_path / "bad.png")


def test_palette_cmyk_webp_and_tiff_are_read_as_rgb(tmp_path):
    """Palette and CMYK images come out as the RGB colours Pillow converts them to; WebP (lossless) and TIFF
    keep their RGB pixels."""
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8)
    palette.save(tmp_path / "p.png")
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.tif")
    Image.fromarray(rgb).save(tmp_path / "w.webp", lossless=True)
    Image.fromarray(rgb).save(tmp_path / "t.tiff")
    np.testing.assert_array_equal(
        io_utils.read_image(tmp_path / "p.png"), np.float32(np.asarray(palette.convert("RGB")) / 255)
    )
    np.testing.assert_array_equal(
        io_utils.read_image(tmp_path / "c.tif"), np.float32(np.asarray(cmyk.convert("RGB")) / 255)
    )
    for name in ("w.webp", "t.tiff"):
        np.testing.assert_array_equal(io_utils.read_image(tmp_path / name), (rgb / 255).astype(np.float32))


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    """Outputs are as readable as ``open(path, "w")`` makes them, not owner-only like ``mkstemp``'s file."""
    (tmp_path / "plain.json").write_text("{}")
    io_utils.write_json(tmp_path / "atomic.json", {})
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic.json") == mode("plain.json")
