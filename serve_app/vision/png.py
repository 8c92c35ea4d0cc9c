"""PNG pixel-data length: a PNG must hold exactly the pixels its header claims.

Pillow decodes the rows the header (IHDR) declares and silently ignores compressed data
left over, so a file that claims 64x32 but holds 64x64 would be served as something it is
not. `check_png_length()` inflates the image data (IDAT chunks) with a bound of one byte
more than the header's rows need, so a file that holds more, or less, is refused, and a
decompression bomb never inflates past what the header, already under the pixel caps,
allows.
"""

from __future__ import annotations

import struct
import zlib

from serve_app.errors import InvalidImage

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
# NOTE: Adam7 passes: (x0, y0, dx, dy).
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def check_png_length(data: bytes, index: int) -> None:
    """Refuse a PNG whose image data inflates to more or fewer bytes than its header needs.

    Raises:
        InvalidImage: the data does not match the header (422).
    """
    header, idat = _chunks(data, index)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    bits = depth * _CHANNELS.get(colour, 0)
    if bits == 0:
        raise InvalidImage(f"inputs[{index}]: PNG colour type {colour} is not valid")
    expected = _raw_length(width, height, bits, interlace == 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(idat, expected + 1)
    except zlib.error as exc:
        raise InvalidImage(f"inputs[{index}]: the PNG image data is corrupt ({exc})") from exc
    if len(raw) != expected:
        held = "more" if len(raw) > expected else "less"
        raise InvalidImage(
            f"inputs[{index}]: the PNG header claims {width}x{height} pixels but the file "
            f"holds {held} image data than that"
        )


def _raw_length(width: int, height: int, bits: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines (one filter byte per row) for the header's image."""
    if not interlaced:
        return height * (1 + (width * bits + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        pass_w = (width - x0 + dx - 1) // dx if width > x0 else 0
        pass_h = (height - y0 + dy - 1) // dy if height > y0 else 0
        if pass_w and pass_h:
            total += pass_h * (1 + (pass_w * bits + 7) // 8)
    return total


def _chunks(data: bytes, index: int) -> tuple[bytes, bytes]:
    """The IHDR payload and the concatenated IDAT payloads."""
    if not data.startswith(SIGNATURE):
        raise InvalidImage(f"inputs[{index}] is not a PNG file")
    offset, header, idat = len(SIGNATURE), b"", []
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        payload = data[offset + 8 : offset + 8 + length]
        if len(payload) != length:
            raise InvalidImage(f"inputs[{index}]: the PNG file is truncated")
        if kind == b"IHDR":
            header = payload
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
        offset += 12 + length
    if len(header) != 13 or not idat:
        raise InvalidImage(f"inputs[{index}]: the PNG file has no header or no image data")
    return header, b"".join(idat)
