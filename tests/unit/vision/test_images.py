"""Hostile and odd image inputs: each refused with its own typed error (400, 413, 422)
before or during decode, never an unexpected exception; good ones come back as RGB."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serve_app.errors import BadRequest, FleetError, ImageTooLarge, InvalidImage, InvalidInput
from serve_app.vision.images import MAX_IMAGE_PIXELS, check_images, decode_rgb
from tests.support import bomb_png, claim_size, encoded_image, raw_png


def refused(item: object) -> FleetError:
    """The error checking then decoding `item` raises (it must raise)."""
    with pytest.raises(FleetError) as caught:
        check_then_decode(item)
    return caught.value


def check_then_decode(item: object) -> Image.Image:
    """What an image goes through: the ingress's check, then the host's decode."""
    (checked,) = check_images([item], "m")
    return decode_rgb(checked)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("PNG", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "L"),
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("WEBP", "RGB"),
    ],
)
def test_good_images_decode_to_rgb(fmt: str, mode: str) -> None:
    data = encoded_image(33, 21, fmt, mode)
    for item in (
        data,
        base64.b64encode(data).decode(),
        "data:image/x;base64," + base64.b64encode(data).decode(),
    ):
        (checked,) = check_images([item], "m")
        assert checked == data
        image = decode_rgb(checked)
        assert (image.mode, image.size) == ("RGB", (33, 21))


def test_bomb_is_refused_from_its_header_before_decoding() -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 10  # just over the cap, under Pillow's own limit
    data = bomb_png(side, side)
    assert len(data) < 200_000  # a small file...
    error = refused(data)  # ...refused without inflating ~40 MB
    assert isinstance(error, ImageTooLarge)
    assert error.status_code == 413
    assert f"{side}x{side}" in str(error)


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (100_000, 100_000), (65_000, 1)])
def test_huge_dimensions_are_413(width: int, height: int) -> None:
    error = refused(claim_size(encoded_image(8, 8), width, height))
    assert isinstance(error, ImageTooLarge)
    assert error.status_code == 413


@pytest.mark.parametrize(("width", "height"), [(64, 32), (32, 32), (128, 128), (64, 65)])
def test_png_claiming_another_size_than_it_holds_is_422(width: int, height: int) -> None:
    error = refused(claim_size(encoded_image(64, 64), width, height))
    assert isinstance(error, InvalidImage)
    assert "claims" in str(error) or "truncated" in str(error)


def test_truncated_files_are_422() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = encoded_image(64, 64, fmt)
        error = refused(data[: len(data) // 2])
        assert isinstance(error, InvalidImage), fmt
        assert error.status_code == 422


def test_corrupt_jpeg_body_is_422_or_decodes() -> None:
    """Garbage inside a JPEG's scan data: a 422, never anything but a typed error."""
    data = bytearray(encoded_image(64, 64, "JPEG"))
    data[len(data) // 2 : len(data) // 2 + 200] = bytes(range(200))
    try:
        check_then_decode(bytes(data))
    except FleetError as exc:
        status = exc.status_code
    else:
        status = 200  # NOTE: libjpeg may decode damaged scan data as noise
    assert status in (200, 422)


@pytest.mark.parametrize(
    ("data", "mode"),
    [
        (encoded_image(16, 16, "JPEG", "CMYK"), "CMYK"),
        (encoded_image(16, 16, "PNG", "P"), "P"),
    ],
)
def test_unsupported_modes_are_422(data: bytes, mode: str) -> None:
    error = refused(data)
    assert isinstance(error, InvalidImage)
    assert repr(mode) in str(error)


def test_sixteen_bit_pngs_are_422() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(buffer, "PNG")
    assert isinstance(refused(buffer.getvalue()), InvalidImage)
    rows = b"".join(b"\x00" + b"\x12\x34" * 3 * 4 for _ in range(4))
    rgb16 = raw_png(4, 4, 16, 2, rows)  # 16-bit RGB: Pillow would reduce it to 8 bits
    error = refused(rgb16)
    assert isinstance(error, InvalidImage)
    assert "16-bit" in str(error)


def test_other_formats_and_garbage_are_422() -> None:
    for data in (encoded_image(8, 8, "GIF"), encoded_image(8, 8, "BMP"), b"not an image", b""):
        error = refused(data)
        assert isinstance(error, InvalidImage)
        assert "JPEG, PNG or WebP" in str(error)


def test_not_base64_is_400_and_wrong_types_are_422() -> None:
    assert isinstance(refused("%%% not base64 %%%"), BadRequest)
    for item in (12, None, ["a"], {"image": "x"}):
        error = refused(item)
        assert type(error) is InvalidInput


def test_raw_arrays() -> None:
    pixels = np.zeros((5, 7, 3), dtype=np.uint8)
    (checked,) = check_images([pixels], "m")
    assert decode_rgb(checked).size == (7, 5)
    for bad in (np.zeros((5, 7), np.uint8), np.zeros((5, 7, 4), np.uint8), np.zeros((5, 7, 3))):
        assert type(refused(bad)) is InvalidInput
    assert isinstance(refused(np.zeros((1, 20_000, 3), np.uint8)), ImageTooLarge)


def test_index_of_the_bad_input_is_named() -> None:
    good = encoded_image(8, 8)
    with pytest.raises(InvalidImage, match=r"inputs\[2\]"):
        check_images([good, good, b"junk"], "m")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_mutated_files_never_raise_anything_but_typed_errors(fmt: str) -> None:
    """Seeded fuzzing: flipped bytes, cut files and spliced garbage either decode to an
    RGB image or raise a typed 4xx error, never anything a server would turn into a 500."""
    rng = np.random.default_rng(2026)
    original = encoded_image(48, 40, fmt, "RGBA" if fmt == "PNG" else "RGB", seed=5)
    outcomes = {"decoded": 0, "refused": 0}
    statuses: set[int] = set()
    for _ in range(300):
        data = bytearray(original)
        kind = rng.integers(3)
        if kind == 0:  # flip a few bytes anywhere (headers included)
            for at in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
                data[at] = int(rng.integers(256))
        elif kind == 1:  # cut the file short
            data = data[: int(rng.integers(1, len(data)))]
        else:  # splice random bytes into the middle
            at = int(rng.integers(0, len(data)))
            data[at:at] = rng.integers(
                0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8
            ).tobytes()
        try:
            image = check_then_decode(bytes(data))
        except FleetError as exc:
            statuses.add(exc.status_code)
            outcomes["refused"] += 1
        else:
            assert image.mode == "RGB"
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0
    assert statuses <= {400, 413, 422}
