"""decode_image's limits (raycmr/data/transforms.py), without Ray: format and shape refused from
the header before any pixel is decoded, PIL's bomb warning an error, JPEGs decoded at reduced
scale (peak memory measured in a child process against a full decode)."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raycmr.data.transforms import (
    MAX_IMAGE_ASPECT,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    ImageRejected,
    decode_image,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_hostile_probe import blank_png


def _encoded(fmt: str, size=(40, 30), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt, **({"lossless": True}
                                                           if fmt == "WEBP" else {}))
    return out.getvalue()


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG header whose pixel data is garbage: decoding it would fail (422), so a 413 proves
    the shape was refused from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    head = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", b"garbage!" * 4)
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_formats_decode_to_the_exact_colour(fmt) -> None:
    out, flipped = decode_image(_encoded(fmt), 16)
    assert out.shape == (3, 16, 16) and not flipped
    expected = np.array([200, 30, 30], np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(out.reshape(3, -1).T, np.tile(expected, (256, 1)), atol=1e-6)


def test_jpeg_decodes_close_to_its_colour() -> None:
    out, _ = decode_image(_encoded("JPEG"), 16)
    expected = np.array([200, 30, 30], np.float32) / 127.5 - 1.0
    assert np.abs(out.reshape(3, -1).T - expected).max() < 4 / 127.5  # JPEG's rounding


@pytest.mark.parametrize("fmt,name", [("GIF", "GIF"), ("TIFF", "TIFF"), ("BMP", "BMP")])
def test_other_formats_are_refused_with_415(fmt, name) -> None:
    with pytest.raises(ImageRejected, match=f"image format {name} is not accepted: send JPEG, "
                                            "PNG or WebP") as info:
        decode_image(_encoded(fmt), 16)
    assert info.value.status == 415


@pytest.mark.parametrize("width,height,status,needle", [
    (1, 1_000_000, 413, f"the limit is {MAX_IMAGE_SIDE} per side"),
    (MAX_IMAGE_SIDE + 1, 100, 413, f"the limit is {MAX_IMAGE_SIDE} per side"),
    (5001, 5000, 413, f"{MAX_IMAGE_PIXELS:,} in all"),
    (20000, 20000, 413, "decompression-bomb limit"),
    (10, 201, 422, f"differ by at most {MAX_IMAGE_ASPECT:g}x"),
])
def test_shapes_are_refused_from_the_header(width, height, status, needle) -> None:
    with pytest.raises(ImageRejected, match=needle) as info:
        decode_image(_header_only_png(width, height), 16)
    assert info.value.status == status


def test_limits_are_inclusive() -> None:
    """20:1 and 25 M pixels pass (the real pixels decode); one more pixel of either does not."""
    assert decode_image(blank_png(10, 200), 8)[0].shape == (3, 8, 8)
    assert decode_image(blank_png(5000, 5000), 8)[0].shape == (3, 8, 8)
    with pytest.raises(ImageRejected):
        decode_image(blank_png(10, 201), 8)


def test_truncated_and_non_images_get_422() -> None:
    png = _encoded("PNG", size=(64, 64))
    for data, needle in [(png[:len(png) // 2], "not a decodable image"),
                         (b"not an image", "not a decodable image: send a JPEG, PNG or WebP")]:
        with pytest.raises(ImageRejected, match=needle) as info:
            decode_image(data, 16)
        assert info.value.status == 422
        assert "\n" not in str(info.value)


def test_pil_bomb_warning_is_an_error(monkeypatch) -> None:
    """Between PIL's MAX_IMAGE_PIXELS and twice it PIL only warns; decode_image refuses."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageRejected, match="decompression-bomb limit") as info:
        decode_image(_encoded("PNG", size=(40, 30)), 16)  # 1200 pixels: a warning in PIL
    assert info.value.status == 413


def test_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch) -> None:
    """A 6000 x 4000 JPEG (72 MB as RGB) to 64 x 64: the decoder runs at 1/8 scale (750 x 500,
    1.1 MB), the smallest of JPEG's 1/2/4/8 scales that still covers 64 px on the short side."""
    from PIL import JpegImagePlugin

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    data = io.BytesIO()
    small.resize((6000, 4000), Image.NEAREST).save(data, format="JPEG", quality=90)
    decoded = []
    load = JpegImagePlugin.JpegImageFile.load

    def recording_load(self):
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording_load)
    out, _ = decode_image(data.getvalue(), 64)
    assert out.shape == (3, 64, 64)
    assert set(decoded) == {(750, 500)}
