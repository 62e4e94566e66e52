"""Image inputs without a server: sniffing, safe decoding, data: URIs and preprocessing.

Preprocessing is checked against a reference written here from the Hugging Face image
processor rules (sizes, crop offsets, padding, rescale and normalise in float64), sharing
only Pillow's resize kernel with the code under test; where the geometry alone decides
(nearest-neighbour halving, constant colours, no resize) the reference is pure numpy.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageInvalid,
    ImageLimits,
    ImageSettings,
    check_image_reference,
    decode_image,
    parse_data_uri,
    preprocess,
    sniff_image,
)

Array = np.ndarray[Any, np.dtype[Any]]


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of zeros: a few hundred KB that decode to width x height bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )


# -- sniffing and decoding -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("JPEG", {"quality": 90}), ("GIF", {}), ("WEBP", {}), ("BMP", {})],
)
def test_each_accepted_format_is_sniffed_and_decoded(fmt: str, params: dict[str, Any]) -> None:
    data = encode(noise(20, 10), fmt, **params)
    assert sniff_image(data) == fmt
    decoded = decode_image(data, ImageLimits(), source="the test image")
    assert decoded.format == fmt and decoded.size == (20, 10)
    assert decoded.image.mode == "RGB"


def test_content_decides_not_the_name() -> None:
    html = b"<!DOCTYPE html><html><body>cat.png</body></html>"
    assert sniff_image(html) is None
    with pytest.raises(ImageInvalid, match="not an image: it looks like an HTML page"):
        decode_image(html, ImageLimits(), source="https://x.test/cat.png")
    for data, words in [
        (b"", "empty"),
        (b'{"a": 1}', "JSON"),
        (b"%PDF-1.7 ...", "PDF"),
        (b"II*\x00" + b"\x00" * 20, "TIFF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (bytes(range(256)), "not a known image format"),
    ]:
        with pytest.raises(ImageInvalid, match=words):
            decode_image(data, ImageLimits(), source="x")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = png_bomb(8000, 8000)  # 64 megapixels in a small file
    assert len(bomb) < 200_000
    with pytest.raises(ImageInvalid, match=r"8000×8000 pixels \(64.0 megapixels\); the limit"):
        decode_image(bomb, ImageLimits(max_pixels=32_000_000), source="x")
    # Above Pillow's own threshold (89 MP warns, 178 MP errors) the message is as clear.
    for side in (10_000, 14_000):
        with pytest.raises(ImageInvalid, match="pixels"):
            decode_image(png_bomb(side, side), ImageLimits(), source="x")


def test_byte_limit() -> None:
    data = encode(noise(64, 64))
    with pytest.raises(ImageInvalid, match=f"is {len(data)} bytes; the limit"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1), source="x")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_truncated_files_fail_clearly(fmt: str) -> None:
    data = encode(noise(64, 64), fmt)
    with pytest.raises(ImageInvalid, match=r"truncated or corrupt|not a readable"):
        decode_image(data[: len(data) // 2], ImageLimits(), source="x")


def test_corrupt_header() -> None:
    with pytest.raises(ImageInvalid, match="not a readable PNG image"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, ImageLimits(), source="x")


def test_first_frame_orientation_and_palette_transparency() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue(), ImageLimits(), source="x")
    assert decoded.image.getpixel((0, 0)) == (255, 0, 0)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = decode_image(
        encode(noise(30, 10), "JPEG", exif=exif.tobytes()), ImageLimits(), source="x"
    )
    assert rotated.size == (10, 30)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = b"\x00\xff" + b"\xff" * 254
    # Pillow warns when such an image goes straight to RGB; warnings are errors here.
    assert decode_image(encode(palette), ImageLimits(), source="x").image.getpixel((0, 0)) == (
        255,
        0,
        0,
    )


# -- data: URIs and references ---------------------------------------------------------------


def test_data_uris() -> None:
    png = encode(noise(4, 4))
    b64 = base64.b64encode(png).decode()
    assert parse_data_uri(f"data:image/png;base64,{b64}") == ("image/png", png)
    assert parse_data_uri(f"DATA:image/png;BASE64,{b64[:20]}\n{b64[20:]}")[1] == png
    assert parse_data_uri("data:,a%20b") == ("text/plain", b"a b")
    with pytest.raises(ValueError, match="without the comma"):
        parse_data_uri("data:image/png;base64")
    with pytest.raises(ValueError, match="base64 data is invalid"):
        parse_data_uri("data:image/png;base64,!!!not-base64!!!")


def test_check_image_reference() -> None:
    png = base64.b64encode(encode(noise(4, 4))).decode()
    check_image_reference(f"data:image/png;base64,{png}")
    check_image_reference("https://example.com/cat.png")
    check_image_reference("http://127.0.0.1:5000/v1/files/abc")
    for value, words in [
        ("ftp://example.com/cat.png", "must be an http"),
        ("file:///etc/passwd", "must be an http"),
        ("cat.png", "must be an http"),
        ("https://", "without a host"),
        ("http://host:99999/x", "not a valid URL"),
        ("data:text/plain,hello", "holds no image: it looks like text"),
        ("data:image/png;base64,%%%", "base64 data is invalid"),
    ]:
        with pytest.raises(ValueError, match=words):
            check_image_reference(value)


# -- preprocessing against a reference -------------------------------------------------------


def reference(image: Image.Image, settings: ImageSettings) -> Array:
    """Hugging Face's CLIP / LLaVA / BLIP image-processor rules, written independently."""
    mean = np.array(settings.mean)
    std = np.array(settings.std)
    if settings.resize == "pad_square":
        side = max(image.size)
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        canvas[:] = [int(m * 255) for m in settings.mean]
        w, h = image.size
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = np.asarray(image)
        image = Image.fromarray(canvas)
    if settings.resize == "shortest_edge":
        target = settings.size[0]
        w, h = image.size
        size = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
    else:
        size = (settings.size[1], settings.size[0])
    resample = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}
    if size != image.size:
        image = image.resize(size, resample[settings.resample])
    pixels = np.asarray(image).astype(np.float64)
    if settings.crop_size is not None:
        ch, cw = settings.crop_size
        h, w = pixels.shape[:2]
        top, left = (h - ch) // 2, (w - cw) // 2
        pixels = pixels[top : top + ch, left : left + cw]
    out: Array = ((pixels * settings.rescale_factor - mean) / std).transpose(2, 0, 1)
    return out


@pytest.mark.parametrize(
    ("size", "settings"),
    [
        # LLaVA 1.5 / CLIP: shortest edge 336 then a 336 center crop, both orientations.
        ((500, 375), ImageSettings()),
        ((375, 500), ImageSettings()),
        ((337, 901), ImageSettings()),
        # Smaller than the target: upscaled, then cropped.
        ((50, 80), ImageSettings(size=(64, 64), crop_size=(64, 64))),
        # BLIP-2 / MiniGPT-4: squashed to exactly 224×224.
        ((640, 360), ImageSettings(resize="exact", size=(224, 224), crop_size=None)),
        # LLaVA with pad-to-square: padded with the mean colour, then resized.
        ((300, 120), ImageSettings(resize="pad_square", size=(96, 96), crop_size=None)),
        ((120, 301), ImageSettings(resize="pad_square", size=(96, 96), crop_size=None)),
    ],
)
def test_preprocess_matches_reference(size: tuple[int, int], settings: ImageSettings) -> None:
    image = noise(*size)
    got = preprocess(image, settings)
    expected = reference(image, settings)
    assert got.dtype == np.float32
    assert got.shape == (3, *settings.output_size) == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_preprocess_geometry_without_resampling() -> None:
    image = noise(64, 48)
    arr = np.asarray(image).astype(np.float64)
    # Nearest-neighbour halving picks the odd rows and columns (Pillow samples at centres).
    halved = ImageSettings(resize="exact", size=(24, 32), crop_size=None, resample="nearest")
    expected = ((arr[1::2, 1::2] / 255 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(preprocess(image, halved), expected, atol=1e-5)
    # No resize at all: a crop of the middle, by Hugging Face's offsets ((h - ch) // 2).
    cropped = ImageSettings(size=(48, 48), crop_size=(40, 30))
    expected = ((arr[4:44, 17:47] / 255 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(preprocess(image, cropped), expected, atol=1e-5)
    # A constant colour stays exactly that colour, normalised, whatever the resize does.
    flat = Image.new("RGB", (123, 77), (10, 128, 250))
    got = preprocess(flat, ImageSettings(size=(32, 32), crop_size=(32, 32)))
    want = (np.array([10, 128, 250]) / 255 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(got, np.broadcast_to(want[:, None, None], got.shape), atol=1e-5)


def test_crop_larger_than_image_pads_with_zeros() -> None:
    image = Image.new("RGB", (10, 10), (255, 255, 255))
    settings = ImageSettings(
        resize="exact", size=(10, 10), crop_size=(14, 12), mean=(0, 0, 0), std=(1, 1, 1)
    )
    got = preprocess(image, settings)
    assert got.shape == (3, 14, 12)
    assert got[:, 2:12, 1:11].min() == 1.0 and got[:, :2].max() == 0.0


def test_settings_from_hugging_face_preprocessor_config() -> None:
    llava = ImageSettings.from_hf_preprocessor(
        {
            "crop_size": {"height": 336, "width": 336},
            "do_center_crop": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": 336},
        }
    )
    assert llava == ImageSettings()
    blip = ImageSettings.from_hf_preprocessor(
        {"size": {"height": 224, "width": 224}, "resample": 3, "do_pad": False}
    )
    assert blip.resize == "exact" and blip.size == (224, 224) and blip.crop_size is None
    padded = ImageSettings.from_hf_preprocessor({"size": {"shortest_edge": 384}, "do_pad": True})
    assert padded.resize == "pad_square"
    with pytest.raises(ValueError, match="resize must be"):
        ImageSettings.from_json({"resize": "anyres"})
    with pytest.raises(ValueError, match="unknown image settings: sizes"):
        ImageSettings.from_json({"sizes": 3})
