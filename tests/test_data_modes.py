"""Decoding every PIL mode a dataset file may hold to 8-bit RGB, against expectations computed
from the known pixel values (literal numbers or numpy arithmetic), not from PIL's conversion."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.data import write_list
from wegeft_vision.data import ImageDecodeError, VTAB1kDataModule, load_rgb

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (3, 5), dtype=np.uint8)
COLOUR = RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (3, 5), dtype=np.uint8)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
INDICES = RNG.integers(0, 256, (3, 5), dtype=np.uint8)
# 16-bit values and their 8-bit values written out by hand: round(v * 255 / 65535) = round(v / 257).
WORDS = np.array([[0, 257, 1000, 32768, 65535], [128, 129, 385, 386, 65406],
                  [65407, 12850, 25700, 51400, 771]])
WORDS_8BIT = np.array([[0, 1, 4, 128, 255], [0, 1, 1, 2, 254],
                       [255, 50, 100, 200, 3]])
# Float images: round(v * 255), half up (0.5 -> 127.5 -> 128); small excursions are clipped.
FLOATS = np.array([[0, 0.25, 0.5, 1, 0.2], [1 / 510, 1 / 511, 0.999, 1.0001, -0.0001],
                   [0.75, 0.12, 0.91, 0.4, 0.6]], dtype=np.float32)
FLOATS_8BIT = np.array([[0, 64, 128, 255, 51], [1, 0, 255, 255, 0],
                        [191, 31, 232, 102, 153]])


def grey_rgb(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=2)


def png_16bit(path: Path, pixels: np.ndarray, colour_type: int) -> Path:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit RGB or LA):
    colour type 2 = RGB, 4 = grey + alpha, 0 = grey."""
    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
                     chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def palette_image(transparent: bool) -> Image.Image:
    image = Image.fromarray(INDICES, "P")
    image.putpalette(PALETTE.tobytes())
    if transparent:
        image.info["transparency"] = int(INDICES[0, 0])
    return image


def cmyk_rgb() -> np.ndarray:
    # Pillow's CMYK -> RGB, written out: (255 - C) * (255 - K) / 255, rounded.
    cmyk = np.concatenate([COLOUR, ALPHA[..., None]], axis=2).astype(np.float64)
    return np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255)


def ycbcr_rgb() -> np.ndarray:
    # JPEG's (JFIF) YCbCr -> RGB; Pillow's fixed-point version differs by at most 1.
    y, cb, cr = (COLOUR[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], axis=2)
    return np.clip(np.rint(rgb), 0, 255)


def big_endian_16bit() -> Image.Image:
    return Image.frombytes("I;16B", (5, 3), WORDS.astype(">u2").tobytes())


# mode as the file is read, file name, how to make it, expected RGB, tolerance in grey levels.
CASES = [
    ("1", "bits.png", lambda: Image.fromarray(GREY > 127), grey_rgb((GREY > 127) * 255), 0),
    ("L", "grey.png", lambda: Image.fromarray(GREY), grey_rgb(GREY), 0),
    ("LA", "grey_alpha.png", lambda: Image.fromarray(np.stack([GREY, ALPHA], 2), "LA"),
     grey_rgb(GREY), 0),
    ("P", "palette.png", lambda: palette_image(False), PALETTE[INDICES], 0),
    ("P", "palette_transparent.png", lambda: palette_image(True), PALETTE[INDICES], 0),
    ("PA", "palette_alpha.tif",
     lambda: Image.merge("PA", [palette_image(False), Image.fromarray(ALPHA)]),
     PALETTE[INDICES], 0),
    ("RGB", "rgb.png", lambda: Image.fromarray(COLOUR), COLOUR, 0),
    ("RGBA", "rgba.png", lambda: Image.fromarray(np.concatenate([COLOUR, ALPHA[..., None]], 2)),
     COLOUR, 0),
    ("CMYK", "cmyk.tif",
     lambda: Image.fromarray(np.concatenate([COLOUR, ALPHA[..., None]], 2), "CMYK"),
     cmyk_rgb(), 0),
    ("YCbCr", "ycbcr.tif", lambda: Image.fromarray(COLOUR, "YCbCr"), ycbcr_rgb(), 1),
    ("I;16", "grey16.png", lambda: Image.fromarray(WORDS.astype(np.uint16)),
     grey_rgb(WORDS_8BIT), 0),
    ("I;16", "grey16.tif", lambda: Image.fromarray(WORDS.astype(np.uint16)),
     grey_rgb(WORDS_8BIT), 0),
    ("I;16B", "grey16_big_endian.tif", big_endian_16bit, grey_rgb(WORDS_8BIT), 0),
    ("I", "int32.tif", lambda: Image.fromarray(WORDS.astype(np.int32), "I"),
     grey_rgb(WORDS_8BIT), 0),
    ("F", "float.tif", lambda: Image.fromarray(FLOATS, "F"), grey_rgb(FLOATS_8BIT), 0),
]


@pytest.mark.parametrize("mode, name, make, expected, tolerance", CASES,
                         ids=[case[1] for case in CASES])
def test_every_mode_decodes_to_the_expected_rgb(tmp_path, mode, name, make, expected, tolerance):
    path = tmp_path / name
    make().save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really holds the mode under test
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (5, 3)
    difference = np.abs(np.asarray(image, dtype=np.int64) - np.asarray(expected, dtype=np.int64))
    assert difference.max() <= tolerance


@pytest.mark.parametrize("colour_type, channels", [(0, 1), (2, 3), (4, 2)])
def test_16bit_png_files_keep_their_brightness(tmp_path, colour_type, channels):
    # Grey, RGB and grey + alpha at 16 bits. Pillow reads RGB and LA files at 8 bits by keeping
    # each value's high byte (v // 256), within 1 of round(v / 257).
    pixels = np.stack([WORDS] * channels, axis=2)
    if channels == 3:
        pixels[..., 1] = WORDS[::-1]
    path = png_16bit(tmp_path / "deep.png", pixels, colour_type)
    expected = np.floor(pixels / 257 + 0.5)
    rgb = np.asarray(load_rgb(path), dtype=np.int64)
    reference = expected if channels == 3 else np.repeat(expected[..., :1], 3, axis=2)
    assert np.abs(rgb - reference).max() <= (0 if colour_type == 0 else 1)
    assert abs(int(rgb[0, 3, 0]) - 128) <= 1  # mid-grey stays mid-grey, not white


@pytest.mark.parametrize("name, make, message", [
    ("wide_int.tif", lambda: Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I"),
     r"32-bit integer image \(mode I\) with values in \[0, 70000\]: only 0..65535 \(16-bit\) "
     "is read"),
    ("negative_int.tif", lambda: Image.fromarray(np.array([[-1, 5]], dtype=np.int32), "I"),
     r"32-bit integer image \(mode I\) with values in \[-1, 5\]"),
    ("byte_range_float.tif", lambda: Image.fromarray(np.array([[0, 255]], np.float32), "F"),
     r"float image \(mode F\) with values in \[0, 255\]: only \[0, 1\] is read"),
    ("nan_float.tif", lambda: Image.fromarray(np.array([[0, np.nan]], np.float32), "F"),
     r"float image \(mode F\) with values in \[nan, nan\]"),
])
def test_deep_images_outside_the_known_ranges_are_refused(tmp_path, name, make, message):
    path = tmp_path / name
    make().save(path)
    where = re.escape(str(path))
    with pytest.raises(ImageDecodeError, match=rf"cannot decode image {where}: {message}"):
        load_rgb(path)


def test_16bit_images_reach_the_batch_scaled(tmp_path):
    # A mid-grey 16-bit PNG in a VTAB-1k task: its batch is (128 / 255 - mean) / std, not white.
    task = tmp_path / "depth"
    task.mkdir()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(task / "grey.png")
    for name in ("train800", "val200", "train800val200", "test"):
        write_list(task / f"{name}.txt", [("grey.png", 0)])
    dm = VTAB1kDataModule(tmp_path, "depth", image_size=8, mean=(0.2, 0.4, 0.6),
                          std=(0.1, 0.2, 0.3), num_workers=0)
    dm.setup("test")
    images, _ = next(iter(dm.test_dataloader()))
    expected = (128 / 255 - np.array([0.2, 0.4, 0.6])) / np.array([0.1, 0.2, 0.3])
    np.testing.assert_allclose(images[0, :, 0, 0].numpy(), expected, rtol=0, atol=1e-5)
    assert images.shape == (1, 3, 8, 8) and bool((images == images[:, :, :1, :1]).all())
