"""Image inputs: recognising, safely decoding and preprocessing them for a vision encoder.

Everything here is pure and blocking (run it off the event loop). Three stages:

* `sniff_image` names the format from the first bytes; names, extensions and declared
  content types are never trusted.
* `decode_image` decodes only the formats this server accepts, and refuses before decoding
  anything whose header announces more pixels than the limit (a decompression bomb), then
  loads the first frame, applying EXIF orientation, as RGB. Truncated or corrupt files fail
  with a message that says so.
* `preprocess` resizes, crops, rescales and normalises as the model's image processor does
  (the CLIP / LLaVA / BLIP-2 family of Hugging Face image processors), giving `[3, H, W]`
  float32 pixel values.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs
import numpy as np
from PIL import Image, ImageOps

#: Pillow format name -> media type, for the formats accepted as image inputs.
FORMATS: Mapping[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}
ACCEPTED = "PNG, JPEG, GIF, WebP or BMP"

FloatArray = np.ndarray[Any, np.dtype[np.float32]]


class ImageInvalid(ValueError):
    """An image input that cannot be used; the message is meant for the caller."""


@attrs.frozen
class ImageLimits:
    #: Largest encoded image accepted, in bytes.
    max_bytes: int = 20 * 1024 * 1024
    #: Largest decoded image accepted, in pixels (width × height).
    max_pixels: int = 32_000_000


@attrs.frozen(eq=False)
class DecodedImage:
    """A decoded RGB image and where it came from (for messages)."""

    image: Image.Image
    format: str
    source: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return self.image.size


@attrs.frozen(eq=False)
class InputFile:
    """The bytes of a `format: uri` input that are not an image (the model decides)."""

    data: bytes
    source: str


def sniff_image(data: bytes) -> str | None:
    """The Pillow format name of an accepted image format, from its magic bytes; else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    return None


def describe_content(data: bytes) -> str:
    """A few words on what some bytes look like, for 'is not an image' messages."""
    head = data[:512].lstrip()
    lowered = head.lower()
    if not data:
        return "it is empty"
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered:
        return "it looks like an HTML page"
    if lowered.startswith(b"<?xml") or lowered.startswith(b"<svg"):
        return "it looks like XML or SVG, which is not accepted"
    if head[:1] in (b"{", b"["):
        return "it looks like JSON"
    if data.startswith(b"%PDF"):
        return "it is a PDF document"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "it is a TIFF image, which is not accepted"
    try:
        data[:512].decode("utf-8")
    except UnicodeDecodeError:
        return "its content is not a known image format"
    return "it looks like text"


def decode_image(data: bytes, limits: ImageLimits, *, source: str) -> DecodedImage:
    """Decode an accepted image to RGB, refusing oversized, unknown and broken ones."""
    if len(data) > limits.max_bytes:
        raise ImageInvalid(
            f"{source} is {len(data)} bytes; the limit for an image is {limits.max_bytes} bytes"
        )
    fmt = sniff_image(data)
    if fmt is None:
        raise ImageInvalid(f"{source} is not an image: {describe_content(data)}; send {ACCEPTED}")
    try:
        # `formats` stops Pillow from trying every other decoder it has on these bytes.
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInvalid(f"{source} has too many pixels to decode ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInvalid(f"{source} is not a readable {fmt} image: {exc}") from exc
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageInvalid(f"{source} has no pixels ({width}×{height})")
        if width * height > limits.max_pixels:
            raise ImageInvalid(
                f"{source} is {width}×{height} pixels ({width * height / 1e6:.1f} megapixels); "
                f"the limit is {limits.max_pixels / 1e6:.1f} megapixels"
            )
        try:
            image.load()  # the first frame of animations
            upright = ImageOps.exif_transpose(image)
            if upright.mode == "P" and "transparency" in upright.info:
                upright = upright.convert("RGBA")  # Pillow asks for this step (else a warning)
            rgb = upright.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageInvalid(f"{source} has too many pixels to decode ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageInvalid(f"{source} is truncated or corrupt ({fmt}): {exc}") from exc
    return DecodedImage(image=rgb, format=fmt, source=source)


# -- data: URIs --------------------------------------------------------------------------------


def parse_data_uri(uri: str) -> tuple[str, bytes]:
    """(media type, bytes) of an RFC 2397 `data:` URI; ValueError says what is wrong."""
    if not uri[:5].lower() == "data:":
        raise ValueError("is not a data: URI")
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise ValueError("is a data: URI without the comma that starts its data")
    params = [p.strip() for p in header.split(";")]
    is_base64 = bool(params) and params[-1].lower() == "base64"
    media_type = (params[0] if params and "/" in params[0] else "text/plain").lower()
    if is_base64:
        compact = "".join(payload.split())
        try:
            return media_type, base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"is a data: URI whose base64 data is invalid ({exc})") from exc
    return media_type, urllib.parse.unquote_to_bytes(payload)


def check_image_reference(value: str) -> None:
    """Raise ValueError unless `value` can name an image input: http(s) URL or image data: URI.

    Uploaded files are named by their `urls.get` (an http(s) URL), so they pass here; whether
    a URL really holds an image is only known once it is fetched.
    """
    scheme = urllib.parse.urlsplit(value).scheme.lower() if ":" in value else ""
    if scheme == "data":
        _, data = parse_data_uri(value)
        if sniff_image(data) is None:
            raise ValueError(f"is a data: URI that holds no image: {describe_content(data)}")
        return
    if scheme in ("http", "https"):
        try:
            parts = urllib.parse.urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"is not a valid URL: {exc}") from exc
        if not parts.hostname:
            raise ValueError("is a URL without a host")
        return
    raise ValueError(
        "must be an http(s) URL, a data: URI, or the URL of a file uploaded to /v1/files"
    )


# -- preprocessing -----------------------------------------------------------------------------

Resize = Literal["shortest_edge", "exact", "pad_square"]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
#: Hugging Face configs store PIL's resample enum values.
_RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pair(value: Any, what: str) -> tuple[int, int]:
    """(height, width) from an int, a [h, w] list or a {"height", "width"} mapping."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size, not {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, Mapping) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{what} must be an integer, [height, width] or {{height, width}}")


@attrs.frozen(kw_only=True)
class ImageSettings:
    """How a model wants its pixels (the fields of a Hugging Face image processor).

    * `shortest_edge`: scale so the shorter side is `size[0]` (aspect kept), then crop.
    * `exact`: scale to exactly `size` (height, width), aspect not kept (BLIP-2, MiniGPT-4).
    * `pad_square`: pad to a square with the mean colour, then scale to `size` (LLaVA 1.5).

    `crop_size`, when set, center-crops after resizing (zero-padding a smaller image).
    """

    resize: Resize = "shortest_edge"
    size: tuple[int, int] = (336, 336)
    crop_size: tuple[int, int] | None = (336, 336)
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __attrs_post_init__(self) -> None:
        if self.resize not in ("shortest_edge", "exact", "pad_square"):
            raise ValueError(
                f"image resize must be shortest_edge, exact or pad_square, not {self.resize!r}"
            )
        if self.resample not in _RESAMPLE:
            raise ValueError(f"image resample must be one of {', '.join(_RESAMPLE)}")
        if min(self.size) < 1 or (self.crop_size is not None and min(self.crop_size) < 1):
            raise ValueError("image sizes must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("image mean and std need three values each, std above 0")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the pixel values given to the vision encoder."""
        return self.crop_size or self.size

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ImageSettings:
        """From the `image` object of replicant-vlm.json (see docs/vision.md)."""
        known = {"resize", "size", "crop_size", "resample", "rescale_factor", "mean", "std"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown image settings: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        if "resize" in raw:
            values["resize"] = str(raw["resize"])
        if "size" in raw:
            values["size"] = _pair(raw["size"], "image size")
        if "crop_size" in raw:
            crop = raw["crop_size"]
            values["crop_size"] = None if crop is None else _pair(crop, "image crop_size")
        elif values.get("resize") in ("exact", "pad_square"):
            values["crop_size"] = None
        if "resample" in raw:
            values["resample"] = str(raw["resample"])
        if "rescale_factor" in raw:
            values["rescale_factor"] = float(raw["rescale_factor"])
        for key in ("mean", "std"):
            if key in raw:
                values[key] = tuple(float(x) for x in raw[key])
        return cls(**values)

    @classmethod
    def from_hf_preprocessor(cls, raw: Mapping[str, Any]) -> ImageSettings:
        """From a Hugging Face `preprocessor_config.json` (CLIP, LLaVA, BLIP image processors)."""
        size = raw.get("size", 336)
        if raw.get("do_resize", True) is False:
            raise ValueError("preprocessor_config.json turns resizing off, which is not supported")
        if isinstance(size, Mapping) and "shortest_edge" in size:
            resize: Resize = "shortest_edge"
            hw = (int(size["shortest_edge"]),) * 2
        else:
            resize = "exact"
            hw = _pair(size, "size")
        if raw.get("do_pad") is True:
            resize = "pad_square"
        crop = None
        if raw.get("do_center_crop", resize == "shortest_edge"):
            crop = _pair(raw.get("crop_size", hw[0]), "crop_size")
        resample = raw.get("resample", 3)
        rescale = float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0
        normalize = raw.get("do_normalize", True)
        return cls(
            resize=resize,
            size=hw,
            crop_size=crop,
            resample=_RESAMPLE_CODES.get(resample, "bicubic")
            if isinstance(resample, int)
            else str(resample),
            rescale_factor=rescale,
            mean=tuple(raw.get("image_mean", CLIP_MEAN)) if normalize else (0.0, 0.0, 0.0),
            std=tuple(raw.get("image_std", CLIP_STD)) if normalize else (1.0, 1.0, 1.0),
        )


def shortest_edge_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `shortest` (Hugging Face's rule)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def _pad_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    fill = tuple(int(m * 255) for m in mean)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _center_crop(pixels: FloatArray, height: int, width: int) -> FloatArray:
    """Center-crop an HWC array, zero-padding first where it is smaller (Hugging Face's rule)."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), pixels.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = pixels
        pixels, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top : top + height, left : left + width]


def preprocess(image: Image.Image, settings: ImageSettings) -> FloatArray:
    """RGB image -> `[3, H, W]` float32 pixel values for the vision encoder."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if settings.resize == "pad_square":
        image = _pad_square(image, settings.mean)
    if settings.resize == "shortest_edge":
        height, width = shortest_edge_size(image.width, image.height, settings.size[0])
    else:
        height, width = settings.size
    if (width, height) != image.size:
        image = image.resize((width, height), _RESAMPLE[settings.resample])
    pixels = np.asarray(image, dtype=np.float32)
    if settings.crop_size is not None:
        pixels = _center_crop(pixels, *settings.crop_size)
    mean = np.asarray(settings.mean, dtype=np.float32)
    std = np.asarray(settings.std, dtype=np.float32)
    normalized = (pixels * np.float32(settings.rescale_factor) - mean) / std
    return np.ascontiguousarray(normalized.transpose(2, 0, 1), dtype=np.float32)
