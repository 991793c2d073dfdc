"""Tests for pixeldensity.decoding: every decode decision, on real broken and edge-case files.

The figures come from pipelines/demo_data/badimages/MANIFEST.md.
"""

import concurrent.futures
import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from pixeldensity.decoding import (
    DECODE_ERROR_REASONS,
    PAD_FILL,
    RESIZE_MODES,
    DecodedImage,
    DecodeError,
    check_decode_options,
    decode_image,
)

BADIMAGES = Path(__file__).parents[1] / "pipelines" / "demo_data" / "badimages"

# What each file must give: "ok" (an image) or the DecodeError reason.
EXPECTED = {
    "10ct_32bit_128.tiff": "unsupported_mode",
    "16bit.MM.cropped.tif": "ok",
    "1_trns.png": "ok",
    "app13-multiple.jpg": "ok",
    "broken.png": "unidentified_image",
    "bw_gradient.png": "ok",
    "decompression_bomb.gif": "decompression_bomb",
    "dispose_bgnd.gif": "ok",
    "empty.jpg": "empty_file",
    "hopper_gray.jpg": "ok",
    "hopper_orientation_6.jpg": "ok",
    "i_trns.png": "ok",
    "icc-after-SOF.jpg": "ok",
    "icc_profile.png": "ok",
    "iss634.webp": "ok",
    "junk_jpeg_header.jpg": "ok",
    "p_trns_single.png": "ok",
    "pil_sample_cmyk.jpg": "ok",
    "png_decompression_dos.png": "decode_failed",
    "pngsuite_basn0g16.png": "ok",
    "pngsuite_basn2c16.png": "ok",
    "pngsuite_s01n3p01.png": "ok",
    "pngsuite_xdtn0g01.png": "no_image_data",
    "pngsuite_xs1n0g01.png": "unidentified_image",
    "transparent.png": "ok",
    "truncated_image.png": "truncated",
    "truncated_jpeg.jpg": "truncated",
    "zero_width.gif": "unidentified_image",
}

IMAGE_FILES = sorted(path.name for path in BADIMAGES.iterdir() if path.suffix != ".md")


def _read(name: str) -> bytes:
    return (BADIMAGES / name).read_bytes()


def _decode_native(name: str, channels: int = 3) -> DecodedImage:
    """Decodes a file at its own (EXIF-oriented) size, so no resampling is involved."""
    with Image.open(BADIMAGES / name) as image:
        width, height = image.size
    return decode_image(_read(name), channels=channels, size=(height, width))


def _png_bytes(pixels: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG with an IHDR chunk claiming (width, height) and no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_expected_covers_every_test_image():
    assert set(EXPECTED) == set(IMAGE_FILES)


@pytest.mark.parametrize("name", IMAGE_FILES)
def test_decode_image_every_file_gives_image_or_decode_error(name):
    try:
        decoded = decode_image(_read(name), channels=3, size=(32, 32))
    except DecodeError as error:
        assert error.reason == EXPECTED[name]
        assert error.reason in DECODE_ERROR_REASONS
        assert error.message
        return

    assert EXPECTED[name] == "ok"
    assert decoded.image.shape == (3, 32, 32)
    assert decoded.image.dtype == np.uint8
    assert decoded.image.flags.c_contiguous and decoded.image.flags.writeable


@pytest.mark.parametrize("name", [name for name in IMAGE_FILES if EXPECTED[name] == "ok"])
def test_decode_image_one_channel_shape(name):
    decoded = decode_image(_read(name), channels=1, size=(20, 24))

    assert decoded.image.shape == (1, 20, 24)


def test_decode_image_png_text_bomb_keeps_pillow_message():
    with pytest.raises(DecodeError, match="MAX_TEXT_CHUNK") as caught:
        decode_image(_read("png_decompression_dos.png"), channels=1, size=(8, 8))

    assert caught.value.reason == "decode_failed"


def test_decode_image_16bit_scaled_by_declared_depth():
    decoded = _decode_native("pngsuite_basn0g16.png", channels=1)
    raw = np.asarray(Image.open(BADIMAGES / "pngsuite_basn0g16.png")).astype(np.float64)

    assert decoded.original_mode == "I;16"
    assert decoded.image.mean() == pytest.approx(143.9, abs=0.1)  # naive convert: 254.8
    np.testing.assert_array_equal(decoded.image[0], np.round(raw / 257))


def test_decode_image_16bit_with_8bit_values_decodes_dark():
    # i_trns.png stores 0..255 in 16-bit samples: v / 257 makes it nearly black, as declared,
    # and its tRNS value 255 (13.6% of pixels) becomes the white background.
    decoded = _decode_native("i_trns.png", channels=1)
    raw = np.asarray(Image.open(BADIMAGES / "i_trns.png"))
    transparent = raw == 255

    assert transparent.mean() == pytest.approx(0.136, abs=0.001)
    assert np.all(decoded.image[0][transparent] == 255)
    assert decoded.image[0][~transparent].max() <= 1
    assert decoded.image.mean() == pytest.approx(35.1, abs=0.05)


def test_decode_image_16bit_big_endian_tiff():
    decoded = _decode_native("16bit.MM.cropped.tif", channels=1)

    # Samples 291..694 map to round(v / 257) = 1..3.
    assert decoded.original_mode == "I;16B"
    assert decoded.image.min() == 1 and decoded.image.max() == 3


def test_decode_image_alpha_composited_on_white():
    decoded = _decode_native("transparent.png")

    assert decoded.image.shape == (3, 150, 200)
    assert decoded.image.mean() == pytest.approx(205.9, abs=0.05)  # naive convert: 28.5


def test_decode_image_palette_transparency_becomes_white():
    decoded = _decode_native("p_trns_single.png")
    indices = np.asarray(Image.open(BADIMAGES / "p_trns_single.png"))
    transparent = indices == 164

    assert transparent.mean() == pytest.approx(0.214, abs=0.001)
    assert np.all(decoded.image[:, transparent] == 255)


def test_decode_image_cmyk_converted_without_inversion():
    decoded = _decode_native("pil_sample_cmyk.jpg")
    expected = np.asarray(Image.open(BADIMAGES / "pil_sample_cmyk.jpg").convert("RGB"))

    assert decoded.original_mode == "CMYK"
    np.testing.assert_array_equal(decoded.image, expected.transpose(2, 0, 1))
    assert decoded.image.mean() == pytest.approx(14.4, abs=0.05)


def test_decode_image_applies_exif_orientation():
    decoded = _decode_native("hopper_orientation_6.jpg")
    raw = Image.open(BADIMAGES / "hopper_orientation_6.jpg")
    upright = np.asarray(raw.transpose(Image.Transpose.ROTATE_270)).transpose(2, 0, 1)
    stored = np.asarray(raw).transpose(2, 0, 1)

    np.testing.assert_array_equal(decoded.image, upright)
    assert np.abs(decoded.image.astype(int) - stored).mean() > 20


def test_decode_image_animation_gives_first_frame_and_count():
    decoded = _decode_native("dispose_bgnd.gif")
    first_frame = np.asarray(Image.open(BADIMAGES / "dispose_bgnd.gif").convert("RGB"))

    assert decoded.is_animated and decoded.num_frames == 5
    np.testing.assert_array_equal(decoded.image, first_frame.transpose(2, 0, 1))


def test_decode_image_animated_webp_flags():
    decoded = decode_image(_read("iss634.webp"), channels=3, size=(32, 32))

    assert decoded.is_animated and decoded.num_frames == 42
    assert decoded.original_format == "WEBP"


def test_decode_image_still_image_flags():
    decoded = decode_image(_read("hopper_gray.jpg"), channels=1, size=(32, 32))

    assert not decoded.is_animated and decoded.num_frames == 1
    assert (decoded.original_width, decoded.original_height) == (128, 128)
    assert (decoded.original_mode, decoded.original_format) == ("L", "JPEG")


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_decode_image_one_pixel_palette_upsampled(resize):
    decoded = decode_image(_read("pngsuite_s01n3p01.png"), channels=3, size=(28, 28), resize=resize)
    colour = np.asarray(Image.open(BADIMAGES / "pngsuite_s01n3p01.png").convert("RGB"))[0, 0]

    assert decoded.image.shape == (3, 28, 28)
    np.testing.assert_array_equal(
        decoded.image, np.broadcast_to(colour[:, None, None], (3, 28, 28))
    )


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_decode_image_resize_deterministic(resize):
    data = _read("bw_gradient.png")

    first = decode_image(data, channels=1, size=(28, 28), resize=resize)
    second = decode_image(data, channels=1, size=(28, 28), resize=resize)

    np.testing.assert_array_equal(first.image, second.image)


def test_decode_image_stretch_keeps_whole_gradient():
    image = decode_image(_read("bw_gradient.png"), channels=1, size=(28, 28), resize="stretch")
    pixels = image.image[0].astype(int)

    assert np.all(pixels == pixels[0])  # every row alike
    assert np.all(np.diff(pixels[0]) > 0)
    assert pixels[0, 0] < 10 and pixels[0, -1] > 245


def test_decode_image_center_crop_keeps_middle_of_gradient():
    # 256x10 to 28x28: the centred 10x10 box, columns 123..133, holds values 123..132.
    image = decode_image(_read("bw_gradient.png"), channels=1, size=(28, 28), resize="center_crop")
    pixels = image.image[0].astype(int)

    assert np.all(pixels == pixels[0])
    assert np.all(np.diff(pixels[0]) >= 0)
    assert 120 <= pixels.min() and pixels.max() <= 135


def test_decode_image_pad_centres_on_fill():
    # 256x10 fits 28 wide as a 28x1 strip, on row (28 - 1) // 2 = 13.
    image = decode_image(_read("bw_gradient.png"), channels=1, size=(28, 28), resize="pad")
    pixels = image.image[0].astype(int)

    assert np.all(np.delete(pixels, 13, axis=0) == PAD_FILL)
    assert np.all(np.diff(pixels[13]) > 0)


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_decode_image_target_size_passes_through_bit_exact(resize):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    colour = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)

    decoded_grey = decode_image(_png_bytes(grey, "L"), channels=1, size=(28, 28), resize=resize)
    decoded_colour = decode_image(
        _png_bytes(colour, "RGB"), channels=3, size=(32, 32), resize=resize
    )

    np.testing.assert_array_equal(decoded_grey.image[0], grey)
    np.testing.assert_array_equal(decoded_colour.image, colour.transpose(2, 0, 1))


def test_decode_image_grey_to_rgb_replicates():
    decoded = _decode_native("hopper_gray.jpg", channels=3)
    grey = np.asarray(Image.open(BADIMAGES / "hopper_gray.jpg"))

    for channel in decoded.image:
        np.testing.assert_array_equal(channel, grey)


def test_decode_image_rgb_to_grey_uses_pillow_luma():
    decoded = _decode_native("app13-multiple.jpg", channels=1)
    expected = np.asarray(Image.open(BADIMAGES / "app13-multiple.jpg").convert("L"))

    np.testing.assert_array_equal(decoded.image[0], expected)


def test_decode_image_max_pixels_cap():
    data = _read("hopper_gray.jpg")  # 128 x 128 = 16384 pixels

    decode_image(data, channels=1, size=(8, 8), max_pixels=16384)
    with pytest.raises(DecodeError, match="16384 pixels") as caught:
        decode_image(data, channels=1, size=(8, 8), max_pixels=16383)
    assert caught.value.reason == "decompression_bomb"


def test_decode_image_bomb_gif_rejected_even_with_high_cap():
    with pytest.raises(DecodeError) as caught:
        decode_image(_read("decompression_bomb.gif"), channels=1, size=(8, 8), max_pixels=10**12)

    assert caught.value.reason == "decompression_bomb"


def test_decode_image_pillow_bomb_warning_rejected_silently():
    # Between Pillow's warning and error thresholds Pillow only warns; that warning rejects.
    limit = Image.MAX_IMAGE_PIXELS
    data = _png_header_only(limit // 1000 + 1, 1100)
    filters_before = list(warnings.filters)

    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        with pytest.raises(DecodeError) as caught:
            decode_image(data, channels=1, size=(8, 8), max_pixels=10**12)

    assert caught.value.reason == "decompression_bomb"
    assert not [
        w for w in caught_warnings if issubclass(w.category, Image.DecompressionBombWarning)
    ]
    assert warnings.filters == filters_before


def test_decode_image_leaves_pillow_globals_alone():
    before = (
        ImageFile.LOAD_TRUNCATED_IMAGES,
        Image.MAX_IMAGE_PIXELS,
        PngImagePlugin.MAX_TEXT_CHUNK,
        list(warnings.filters),
    )

    for name in IMAGE_FILES:
        try:
            decode_image(_read(name), channels=3, size=(16, 16))
        except DecodeError:
            pass

    after = (
        ImageFile.LOAD_TRUNCATED_IMAGES,
        Image.MAX_IMAGE_PIXELS,
        PngImagePlugin.MAX_TEXT_CHUNK,
        list(warnings.filters),
    )
    assert after == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_image_threads_leave_warning_filters_alone():
    data = _png_header_only(Image.MAX_IMAGE_PIXELS // 1000 + 1, 1100)
    filters_before = list(warnings.filters)

    def decode_many(_):
        for _ in range(20):
            with pytest.raises(DecodeError):
                decode_image(data, channels=1, size=(8, 8), max_pixels=10**12)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(decode_many, range(4)))

    assert warnings.filters == filters_before


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"channels": 2, "size": (8, 8)}, r"channels must be 1 or 3, got 2"),
        ({"channels": 1, "size": (0, 8)}, r"size must be a \(height, width\) pair.*\(0, 8\)"),
        ({"channels": 1, "size": (8,)}, r"size must be"),
        ({"channels": 1, "size": (8, 8), "resize": "crop"}, r"resize must be one of .*'crop'"),
        ({"channels": 1, "size": (8, 8), "max_pixels": 0}, r"max_pixels must be a positive int"),
    ],
)
def test_check_decode_options_rejects_bad_values(options, match):
    with pytest.raises(ValueError, match=match):
        check_decode_options(**options)
    with pytest.raises(ValueError, match=match):
        decode_image(_read("hopper_gray.jpg"), **options)


def test_decode_image_rejects_non_bytes():
    with pytest.raises(TypeError, match="data must be bytes, got str"):
        decode_image("hopper_gray.jpg", channels=1, size=(8, 8))


def test_decode_error_is_value_error_and_pickles():
    error = DecodeError("truncated", "image file is truncated")

    restored = pickle.loads(pickle.dumps(error))

    assert isinstance(restored, ValueError)
    assert (restored.reason, restored.message) == ("truncated", "image file is truncated")
    assert str(restored) == "truncated: image file is truncated"


def test_decode_error_reasons_unique_and_cover_expected():
    assert len(set(DECODE_ERROR_REASONS)) == len(DECODE_ERROR_REASONS)
    assert set(EXPECTED.values()) - {"ok"} <= set(DECODE_ERROR_REASONS)
