"""The one image reader/writer of the CLI, trainer and evaluation, on real files written by PIL and OpenCV."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms

from ridfr_core.io.images import ImageReadError, read_metadata, read_rgb, write_rgb


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_exif_orientation_is_applied_on_read(tmp_path):
    """A camera stores the pixels sideways with orientation 6 (rotate 90 clockwise to view)."""
    upright = gradient()
    stored_sideways = np.rot90(upright, k=1)  # what the camera wrote: viewing it needs a clockwise turn
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "camera.png"
    Image.fromarray(stored_sideways).save(path, exif=exif.tobytes())
    assert np.array_equal(read_rgb(path), upright)
    assert read_rgb(path).flags.writeable  # torch.from_numpy warns on read-only arrays
    assert read_metadata(path)["exif"]  # written back with orientation 1, since the pixels are upright now
    rewritten = tmp_path / "out.png"
    write_rgb(rewritten, read_rgb(path), metadata=read_metadata(path))
    assert np.array_equal(read_rgb(rewritten), upright)
    assert Image.open(rewritten).getexif()[0x0112] == 1


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 65536, (32, 40), dtype=np.uint16)
    colour = rng.integers(0, 65536, (32, 40, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "grey16.png"), grey)
    cv2.imwrite(str(tmp_path / "colour16.png"), colour[..., ::-1])  # OpenCV writes BGR
    cv2.imwrite(str(tmp_path / "rgba16.png"), np.dstack([colour[..., ::-1], np.full(grey.shape, 65535, np.uint16)]))
    expected_grey = np.round(grey / 257.0).astype(np.uint8)
    assert np.array_equal(read_rgb(tmp_path / "grey16.png"), np.repeat(expected_grey[..., None], 3, axis=-1))
    expected_colour = np.round(colour / 257.0).astype(np.uint8)
    assert np.array_equal(read_rgb(tmp_path / "colour16.png"), expected_colour)
    assert np.array_equal(read_rgb(tmp_path / "rgba16.png"), expected_colour)


def test_jpeg_is_written_at_high_quality_with_the_profile_and_exif(tmp_path):
    image = cv2.GaussianBlur(gradient(128, 128), (0, 0), 2)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "RIDFR test camera"  # Make
    source = tmp_path / "source.png"
    Image.fromarray(image).save(source, icc_profile=icc, exif=exif.tobytes())

    assert read_rgb(source).flags.writeable
    out = tmp_path / "out.jpg"
    write_rgb(out, read_rgb(source), metadata=read_metadata(source))
    with Image.open(out) as written:
        assert written.info.get("icc_profile") == icc
        assert written.getexif()[0x010F] == "RIDFR test camera"
    error = np.abs(read_rgb(out).astype(int) - image).mean()
    low = tmp_path / "low.jpg"
    write_rgb(low, image, quality=30)
    assert error < 0.5 * np.abs(read_rgb(low).astype(int) - image).mean()
    assert error < 1.5  # PIL's default quality 75 with 4:2:0 chroma is several times worse on this image


def test_an_exif_too_long_for_jpeg_is_left_out_rather_than_failing_the_write(tmp_path):
    exif = Image.Exif()
    exif[0x010E] = "x" * 70_000  # ImageDescription: fine in a PNG, over a JPEG segment's 64 KB
    source = tmp_path / "source.png"
    Image.fromarray(gradient()).save(source, exif=exif.tobytes())
    write_rgb(tmp_path / "out.png", read_rgb(source), metadata=read_metadata(source))
    assert len(Image.open(tmp_path / "out.png").getexif()[0x010E]) == 70_000
    write_rgb(tmp_path / "out.jpg", read_rgb(source), metadata=read_metadata(source))
    assert np.abs(read_rgb(tmp_path / "out.jpg").astype(int) - gradient()).mean() < 20


def test_an_image_over_the_decompression_bomb_limit_is_a_read_error(tmp_path):
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)
    with pytest.raises(ImageReadError, match="bomb.png.*DecompressionBomb"):
        read_rgb(path, "--lq")
