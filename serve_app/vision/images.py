"""Image inputs: checked before decode at the ingress, decoded to RGB on the model host.

Pillow only (no torchvision). Two steps along the request path:

- `check_images()` (ingress, before a model is routed to or loaded): base64 strings, bytes
  or `uint8` arrays `[H, W, 3]` become `bytes` / arrays; encoded images are checked from
  their header alone (`Image.open` decodes no pixels): a known format (JPEG, PNG, WebP),
  an 8-bit RGB/RGBA/grayscale mode, and dimensions under `MAX_IMAGE_SIDE` and
  `MAX_IMAGE_PIXELS`, so a decompression bomb is refused before any pixel is decoded;
- `decode_rgb()` (model host, in a predict thread): the same checks again (a handle caller
  is not trusted either), then the full decode; a truncated or corrupt file, or a PNG
  holding more or less image data than its header claims (`serve_app.vision.png`), is a 422.

Errors name the input's index: `InvalidImage` (422) for what cannot be decoded or has an
unsupported mode, `ImageTooLarge` (413) for dimensions over the caps, `InvalidInput` (422)
for an input of the wrong type and `BadRequest` (400) for a string that is not base64.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from serve_app.errors import BadRequest, ImageTooLarge, InvalidImage, InvalidInput
from serve_app.vision.png import check_png_length

FORMATS = ("JPEG", "PNG", "WEBP")
MODES = frozenset({"RGB", "RGBA", "L", "LA"})
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_SIDE = 16_384
MAX_BASE64_CHARS = 64 * 2**20
_DATA_URL_PREFIX = "data:"
# NOTE: what a corrupt file makes Pillow raise while decoding (no bare except).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError)

ImageItem = bytes | np.ndarray


def check_images(inputs: list[Any], model_id: str) -> list[ImageItem]:
    """Turn the inputs of an image model into bytes or arrays, checked from headers only.

    Raises:
        BadRequest: a string that is not base64 (400).
        InvalidInput: an input that is not an image (422).
        InvalidImage: an unknown format or an unsupported mode (422).
        ImageTooLarge: dimensions over the caps (413).
    """
    out: list[ImageItem] = []
    for i, item in enumerate(inputs):
        if isinstance(item, np.ndarray):
            out.append(check_array(item, i))
            continue
        data = _as_bytes(item, i, model_id)
        with _open(data, i) as image:
            _check_header(image, i)
        out.append(data)
    return out


def decode_rgb(item: ImageItem, index: int = 0) -> Image.Image:
    """An input as an RGB image: encoded bytes decoded (alpha composited onto white, as
    transformers' `convert_rgb` does), an `[H, W, 3]` uint8 array wrapped.

    Raises:
        InvalidImage: corrupt, truncated or unsupported (422).
        ImageTooLarge: dimensions over the caps (413).
    """
    if isinstance(item, np.ndarray):
        return Image.fromarray(check_array(item, index), "RGB")
    with _open(item, index) as image:
        _check_header(image, index)
        try:
            if image.format == "PNG":
                check_png_length(item, index)
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"inputs[{index}]: {exc}") from exc
        except _DECODE_ERRORS as exc:
            raise InvalidImage(
                f"inputs[{index}]: the {image.format} image is truncated or corrupt ({exc})"
            ) from exc
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (transformers' `convert_rgb`)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_array(item: np.ndarray, index: int) -> np.ndarray:
    """A raw image: uint8 `[H, W, 3]` within the size caps (contiguous)."""
    if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
        raise InvalidInput(
            f"inputs[{index}]: a raw image must be uint8 [H, W, 3], got {item.dtype} "
            f"{list(item.shape)}"
        )
    _check_size(int(item.shape[1]), int(item.shape[0]), index)
    return np.ascontiguousarray(item)


def _as_bytes(item: Any, index: int, model_id: str) -> bytes:
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if not isinstance(item, str):
        raise InvalidInput(
            f"inputs[{index}] must be a base64-encoded JPEG, PNG or WebP image for "
            f"{model_id}, got {type(item).__name__}"
        )
    if len(item) > MAX_BASE64_CHARS:
        raise ImageTooLarge(f"inputs[{index}]: more than {MAX_BASE64_CHARS} base64 characters")
    text = item
    if text.startswith(_DATA_URL_PREFIX):
        _, sep, text = text.partition(",")  # data:image/png;base64,<payload>
        if not sep:
            raise BadRequest(f"inputs[{index}]: a data URL without a ',' before its payload")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"inputs[{index}] is not valid base64 ({exc})") from exc


def _open(data: bytes, index: int) -> Image.Image:
    """The image's header (no pixels decoded), from the allowed formats only."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(
            f"inputs[{index}]: the image header claims far more than {MAX_IMAGE_PIXELS:,} "
            "pixels (a decompression bomb); refused before decoding"
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(
            f"inputs[{index}] is not a JPEG, PNG or WebP image ({len(data)} bytes)"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"inputs[{index}]: unreadable image header ({exc})") from exc


def _check_header(image: Image.Image, index: int) -> None:
    width, height = image.size
    _check_size(width, height, index)
    mode = image.mode
    if mode not in MODES or _sixteen_bit(image):
        shown = f"{mode}, 16-bit" if mode in MODES else mode
        raise InvalidImage(
            f"inputs[{index}]: {image.format} image in mode {shown!r}; send 8-bit RGB, RGBA "
            "or grayscale images (convert CMYK, palette and 16-bit images first)"
        )


def _sixteen_bit(image: Image.Image) -> bool:
    """A 16-bit-per-channel PNG that Pillow would silently reduce to 8 bits."""
    return any(";16" in str(tile.args) for tile in getattr(image, "tile", []) or [])


def _check_size(width: int, height: int, index: int) -> None:
    if width < 1 or height < 1:
        raise InvalidImage(f"inputs[{index}]: image of {width}x{height} pixels is empty")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(
            f"inputs[{index}]: image of {width}x{height} pixels is over the limit "
            f"({MAX_IMAGE_SIDE} per side, {MAX_IMAGE_PIXELS:,} pixels in all)"
        )
