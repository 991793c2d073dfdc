"""Decode policy: the bytes of one image file to a fixed-size uint8 array, or a `DecodeError`.

Training and scoring both call `decode_image`, so a model always sees pixels produced by the same
rules. Each rule is one function below; in order of application:

1. Empty input is rejected (`"empty_file"`).
2. The file is opened and verified on one Pillow handle, then opened again and loaded on a fresh
   handle. `verify()` and `load()` catch different faults, so both must pass.
3. Only the formats in `ALLOWED_FORMATS` are opened. Anything else, or bytes Pillow cannot
   identify, is `"unidentified_image"`. The allow-list keeps Pillow's less common parsers (and
   its Ghostscript-backed EPS/PDF readers) away from untrusted corpus data.
4. Images larger than `max_pixels`, and anything Pillow itself flags as a decompression bomb,
   are `"decompression_bomb"`.
5. Animated files (GIF, WebP, APNG, multi-page TIFF, MPO) give their first frame; the frame
   count is reported.
6. The EXIF orientation is applied (`ImageOps.exif_transpose`); size fields still report the
   file as stored.
7. Pixels become 8-bit greyscale or RGB (`_to_8bit`): 16-bit greyscale by the declared bit
   depth, CMYK and palettes through Pillow's `convert("RGB")`, transparency composited on white.
   32-bit float images are `"unsupported_mode"`.
8. The requested channel count is produced (`_to_channels`), then the requested size
   (`_resize`). Images already at the target size pass through bit-exactly.

Embedded ICC colour profiles are ignored: pixel values are used as stored, without colour
management.
"""

import dataclasses
import io
import logging
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

REASON_EMPTY_FILE = "empty_file"
REASON_UNIDENTIFIED_IMAGE = "unidentified_image"
REASON_DECOMPRESSION_BOMB = "decompression_bomb"
REASON_TRUNCATED = "truncated"
REASON_NO_IMAGE_DATA = "no_image_data"
REASON_UNSUPPORTED_MODE = "unsupported_mode"
REASON_DECODE_FAILED = "decode_failed"

# Every `DecodeError.reason` this module produces.
DECODE_ERROR_REASONS = (
    REASON_EMPTY_FILE,
    REASON_UNIDENTIFIED_IMAGE,
    REASON_DECOMPRESSION_BOMB,
    REASON_TRUNCATED,
    REASON_NO_IMAGE_DATA,
    REASON_UNSUPPORTED_MODE,
    REASON_DECODE_FAILED,
)

RESIZE_MODES = ("center_crop", "stretch", "pad")
DEFAULT_RESIZE = "center_crop"

# 64 Mpx (8192 x 8192): about 200 MB as RGB, far above any image a density model scores.
DEFAULT_MAX_PIXELS = 8192 * 8192

# Pillow format names that `decode_image` will open. Multi-picture JPEGs open through "JPEG"
# (and report format "MPO").
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO")

# Transparent pixels are composited onto white, the background most images are drawn for.
ALPHA_BACKGROUND = 255

# Padding added by resize="pad" is black, the usual letterbox and MNIST border value.
PAD_FILL = 0

# Bilinear with Pillow's area-aware support: antialiased when shrinking, no overshoot (unlike
# bicubic or Lanczos, whose ringing would add edges the density model then has to explain).
# Pillow computes 8-bit resampling in fixed point, so results are identical across machines.
RESAMPLE = Image.Resampling.BILINEAR

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_CONVERTED_TO_RGB = ("P", "CMYK", "YCbCr", "RGBX", "HSV")

# Pillow's message when a file parsed but holds no pixel data (for example a PNG without IDAT).
_NO_DATA_MESSAGE = "cannot load this image"

# Warning filters are process-wide in Python 3.11 and `warnings.catch_warnings` is not
# thread-safe: two threads entering and leaving it out of order could leave our "error" filter
# installed. The lock serialises our own use of it around `Image.open`, which reads headers only.
_OPEN_LOCK = threading.Lock()


class DecodeError(ValueError):
    """An image file that the decode policy rejects.

    Attributes:
        reason: A short machine-readable code, one of `DECODE_ERROR_REASONS`.
        message: A human-readable description of what was wrong.
    """

    def __init__(self, reason: str, message: str):
        """Creates the error.

        Args:
            reason: One of `DECODE_ERROR_REASONS`.
            message: What was wrong with the input, for people reading the error row.
        """
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Rebuild from (reason, message) so the error survives pickling between Beam workers.
        return (type(self), (self.reason, self.message))


@dataclasses.dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded image and what the file said about itself.

    Attributes:
        image: uint8 array of shape (C, H, W), C in {1, 3}, values 0..255.
        original_width: Width in pixels as stored in the file, before EXIF orientation.
        original_height: Height in pixels as stored in the file, before EXIF orientation.
        original_mode: Pillow mode of the file as opened, e.g. "RGB", "P", "I;16", "CMYK".
        original_format: Pillow format name, e.g. "PNG", "JPEG".
        is_animated: Whether the file holds more than one frame.
        num_frames: Number of frames in the file (1 for still images).
    """

    image: np.ndarray
    original_width: int
    original_height: int
    original_mode: str
    original_format: str
    is_animated: bool
    num_frames: int


def check_decode_options(
    *,
    channels: int,
    size: tuple[int, int],
    resize: str = DEFAULT_RESIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Validates the options of `decode_image` without decoding anything.

    Args:
        channels: Output channel count.
        size: Output (height, width).
        resize: Resize policy name.
        max_pixels: Largest accepted width * height.

    Raises:
        ValueError: If an option is out of range; the message names the option and the
            accepted values.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if (
        not isinstance(size, tuple | list)
        or len(size) != 2
        or not all(isinstance(side, int) and not isinstance(side, bool) for side in size)
        or min(size) < 1
    ):
        raise ValueError(f"size must be a (height, width) pair of positive ints, got {size!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def decode_image(
    data: bytes,
    *,
    channels: int,
    size: tuple[int, int],
    resize: str = DEFAULT_RESIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decodes one image file by the module's policy.

    Args:
        data: The complete bytes of one image file.
        channels: 1 for greyscale (ITU-R 601 luma from colour sources) or 3 for RGB
            (greyscale sources replicated).
        size: Output (height, width) in pixels.
        resize: How to reach `size` when the aspect ratio differs: "center_crop" (default;
            scale so the image covers the target, keep the centre), "stretch" (scale each axis
            independently) or "pad" (scale so the image fits, centre it on `PAD_FILL`).
        max_pixels: Images with more than this many pixels (width * height) are rejected.
            Pillow's own limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 179 Mpx by default) still
            applies above it; this module never changes that process-wide setting.

    Returns:
        The decoded image, uint8 (C, H, W), and facts about the file.

    Raises:
        DecodeError: For every input the policy rejects; `reason` is one of
            `DECODE_ERROR_REASONS`.
        ValueError: If an option is invalid (see `check_decode_options`).
        TypeError: If `data` is not bytes-like.
    """
    check_decode_options(channels=channels, size=size, resize=resize, max_pixels=max_pixels)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    _check_not_empty(data)

    image, is_animated, num_frames = _read_first_frame(data, max_pixels)
    original = (image.width, image.height, image.mode, image.format or "")

    image = _apply_exif_orientation(image)
    image = _to_8bit(image)
    image = _to_channels(image, channels)
    image = _resize(image, tuple(size), resize)

    return DecodedImage(
        image=_to_chw_array(image),
        original_width=original[0],
        original_height=original[1],
        original_mode=original[2],
        original_format=original[3],
        is_animated=is_animated,
        num_frames=num_frames,
    )


def _check_not_empty(data: bytes) -> None:
    """Rejects zero-byte input, which Pillow would only call unidentifiable."""
    if not data:
        raise DecodeError(REASON_EMPTY_FILE, "the image file is empty (0 bytes)")


def _read_first_frame(data: bytes, max_pixels: int) -> tuple[Image.Image, bool, int]:
    """Verifies the file, then loads its first frame on a fresh handle.

    A failed verify does not stop the load: when both fail, the load error names the fault
    better (a PNG without image data fails verify with an IndexError but load with "cannot load
    this image"). When only verify fails the file is still rejected, with the verify error.

    Returns:
        The loaded first frame, whether the file is animated, and its frame count.
    """
    verify_error = _verify(data, max_pixels)
    try:
        image, is_animated, num_frames = _load(data, max_pixels)
    except Exception as error:
        raise _classify_error(error, "load") from error
    if verify_error is not None:
        raise _classify_error(verify_error, "verify") from verify_error
    return image, is_animated, num_frames


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Opens the file (headers only) with bomb warnings as errors and the pixel cap checked."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    _check_pixel_count(image, max_pixels)
    return image


def _verify(data: bytes, max_pixels: int) -> Exception | None:
    """Runs Pillow's `verify()` on its own handle.

    Returns:
        The exception `verify()` raised, or None if it passed.

    Raises:
        DecodeError: If the file cannot even be opened.
    """
    try:
        image = _open(data, max_pixels)
    except Exception as error:
        raise _classify_error(error, "open") from error
    try:
        image.verify()
    except Exception as error:
        return error
    return None


def _load(data: bytes, max_pixels: int) -> tuple[Image.Image, bool, int]:
    """Opens the file again and decodes the pixels of its first frame."""
    image = _open(data, max_pixels)

    # Counting frames seeks through the file and returns to frame 0, so count before loading.
    num_frames = int(getattr(image, "n_frames", 1))
    is_animated = bool(getattr(image, "is_animated", False)) or num_frames > 1

    image.load()
    # Some formats (GIF) may grow the canvas while loading a frame.
    _check_pixel_count(image, max_pixels)
    return image, is_animated, num_frames


def _check_pixel_count(image: Image.Image, max_pixels: int) -> None:
    """Rejects images whose width * height exceeds `max_pixels`."""
    num_pixels = image.width * image.height
    if num_pixels > max_pixels:
        raise DecodeError(
            REASON_DECOMPRESSION_BOMB,
            f"image is {image.width}x{image.height} = {num_pixels} pixels, "
            f"over the limit of {max_pixels}",
        )


def _classify_error(error: Exception, stage: str) -> DecodeError:
    """Maps an exception raised while opening, verifying or loading to a `DecodeError`.

    Pillow raises plain OSError for truncation and missing data, so those two are recognised by
    message. If Pillow rewords them the result is the generic "decode_failed", never a crash.

    Args:
        error: The exception Pillow (or this module) raised.
        stage: "open", "verify" or "load", for the message.
    """
    if isinstance(error, DecodeError):
        return error
    text = str(error)
    if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return DecodeError(REASON_DECOMPRESSION_BOMB, text)
    if isinstance(error, UnidentifiedImageError):
        return DecodeError(
            REASON_UNIDENTIFIED_IMAGE,
            f"not an image in a supported format {ALLOWED_FORMATS}",
        )
    if isinstance(error, EOFError) or "truncated" in text.lower():
        return DecodeError(REASON_TRUNCATED, f"{stage}: {type(error).__name__}: {text}")
    if isinstance(error, OSError) and text == _NO_DATA_MESSAGE:
        return DecodeError(REASON_NO_IMAGE_DATA, f"{stage}: the file holds no pixel data")
    return DecodeError(REASON_DECODE_FAILED, f"{stage}: {type(error).__name__}: {text}")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotates or flips the image as its EXIF Orientation tag says.

    An EXIF block Pillow cannot parse is treated as orientation 1 (no change): the pixels
    themselves decoded fine, and rejecting them over metadata would lose the sample.
    """
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:
        logger.debug("ignoring unreadable EXIF orientation: %s: %s", type(error).__name__, error)
        return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Converts any supported mode to 8-bit "L" or "RGB", with transparency composited.

    - "L" and "RGB" pass through; "1" becomes "L" (0 or 255).
    - 16-bit greyscale is scaled by its declared depth (`_sixteen_bit_to_l`).
    - Modes with an alpha band, and images with a tRNS transparent colour or palette alpha,
      are composited onto `ALPHA_BACKGROUND` (`_composite_on_background`).
    - Palette, CMYK, YCbCr, RGBX and HSV go through Pillow's `convert("RGB")`. For CMYK
      JPEGs this already handles Adobe's inverted storage; no extra inversion is applied.
    - 16-bit colour (PNG, TIFF) arrives as "RGB"/"RGBA" already: Pillow keeps the high byte
      while decoding, which differs from round(v / 257) by at most one level.

    Raises:
        DecodeError: "unsupported_mode" for 32-bit float ("F"), LAB, 32-bit integer images
            outside 0..65535 and any other mode not listed.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _sixteen_bit_to_l(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_background(image)
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in _CONVERTED_TO_RGB:
        return image.convert("RGB")
    raise DecodeError(
        REASON_UNSUPPORTED_MODE,
        f"Pillow mode {mode!r} has no defined mapping to 8-bit greyscale or RGB",
    )


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Maps 16-bit greyscale to 8 bits by the declared bit depth: round(v / 257).

    0 maps to 0 and 65535 to 255, whatever range the samples actually use; the mapping never
    looks at the data. A file that stores 8-bit values in a 16-bit container (Pillow's
    `i_trns.png`, samples 0..255) therefore decodes almost black, as its header says it is.
    Mode "I" (32-bit integer, e.g. 16-bit PGM) is taken as 16-bit data when its values lie in
    0..65535 and rejected otherwise. A tRNS transparent grey value is composited like alpha.
    """
    values = np.asarray(image)  # (H, W), uint16 of either byte order, or int32 for mode "I"
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise DecodeError(
            REASON_UNSUPPORTED_MODE,
            f"32-bit integer image with values {values.min()}..{values.max()}, "
            "outside the 16-bit range 0..65535",
        )

    # (v + 128) // 257 is v / 257 rounded to nearest; v / 257 is never exactly halfway.
    grey = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)

    transparency = image.info.get("transparency")
    if transparency is None:
        return Image.fromarray(grey, "L")
    alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
    return Image.fromarray(_blend(grey[:, :, None], alpha)[:, :, 0], "L")


def _composite_on_background(image: Image.Image) -> Image.Image:
    """Composites an image with alpha or a transparent colour onto `ALPHA_BACKGROUND`.

    Pillow's `convert("RGBA")` turns every form of transparency (alpha bands, tRNS colours,
    palette alpha) into one alpha band; the blend is then done here, explicitly.

    Returns:
        An "RGB" image (R = G = B for greyscale sources).
    """
    rgba = np.asarray(image.convert("RGBA"))  # (H, W, 4)
    return Image.fromarray(_blend(rgba[:, :, :3], rgba[:, :, 3]), "RGB")


def _blend(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blends colour over the background: (c * a + bg * (255 - a)) / 255, rounded.

    Args:
        colour: uint8 (H, W, C).
        alpha: uint8 (H, W), 255 = opaque.

    Returns:
        uint8 (H, W, C).
    """
    alpha = alpha.astype(np.uint32)[:, :, None]
    blended = colour.astype(np.uint32) * alpha + ALPHA_BACKGROUND * (255 - alpha)
    return ((blended + 127) // 255).astype(np.uint8)


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Produces 1 channel ("L", ITU-R 601 luma via Pillow) or 3 ("RGB", grey replicated).

    Pillow's luma weights sum to exactly 1 in its fixed-point arithmetic, so a grey image
    that went through RGB comes back unchanged.
    """
    target_mode = "L" if channels == 1 else "RGB"
    if image.mode == target_mode:
        return image
    return image.convert(target_mode)


def _resize(image: Image.Image, size: tuple[int, int], resize: str) -> Image.Image:
    """Brings the image to (height, width) = `size` by the named policy.

    An image already at the target size is returned untouched, so 28x28 training images
    pass through bit-exactly. All policies resample with `RESAMPLE` in one step.
    """
    height, width = size
    if image.size == (width, height):
        return image
    if resize == "stretch":
        return image.resize((width, height), RESAMPLE, reducing_gap=None)
    if resize == "center_crop":
        box = _center_crop_box(image.width, image.height, width, height)
        return image.resize((width, height), RESAMPLE, box=box, reducing_gap=None)
    return _pad(image, width, height)


def _center_crop_box(
    width: int, height: int, target_width: int, target_height: int
) -> tuple[float, float, float, float]:
    """Returns the largest centred source box with the target's aspect ratio.

    Scaling that box to the target is the same as scaling the shorter side to fit and then
    cropping the centre, without rounding an intermediate size. Coordinates may be fractional.
    """
    target_aspect = target_width / target_height
    if width / height > target_aspect:
        crop_width = height * target_aspect
        left = (width - crop_width) / 2
        return (left, 0.0, left + crop_width, float(height))
    crop_height = width / target_aspect
    top = (height - crop_height) / 2
    return (0.0, top, float(width), top + crop_height)


def _pad(image: Image.Image, target_width: int, target_height: int) -> Image.Image:
    """Scales the image to fit inside the target and centres it on `PAD_FILL`.

    The scaled size is rounded to whole pixels (at least 1); odd leftover padding goes to the
    right and bottom.
    """
    scale = min(target_width / image.width, target_height / image.height)
    new_width = min(target_width, max(1, round(image.width * scale)))
    new_height = min(target_height, max(1, round(image.height * scale)))
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), RESAMPLE, reducing_gap=None)

    canvas = Image.new(image.mode, (target_width, target_height), PAD_FILL)
    canvas.paste(image, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def _to_chw_array(image: Image.Image) -> np.ndarray:
    """Converts an "L" or "RGB" image to a writable, contiguous uint8 (C, H, W) array."""
    pixels = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    if pixels.ndim == 2:
        pixels = pixels[None]  # (1, H, W)
    else:
        pixels = pixels.transpose(2, 0, 1)  # (3, H, W)
    return np.array(pixels, dtype=np.uint8, order="C", copy=True)
