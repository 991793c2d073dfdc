"""Decode samples into fixed-size images: the `DecodeImages` transform and its per-sample core.

The decode policy itself (modes, transparency, orientation, resize) lives in
`pixeldensity.decoding`; this stage picks each sample's image member, applies that policy, and
turns every failure into an `ErrorRow`, one sample at a time, so that one bad image never fails
the bundle it arrived in.
"""

import logging

import apache_beam as beam
from apache_beam.metrics import Metrics

from pixeldensity.decoding import (
    DECODE_ERROR_REASONS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_RESIZE,
    REASON_DECODE_FAILED,
    DecodeError,
    check_decode_options,
    decode_image,
)
from transforms.shards import IMAGE_EXTENSIONS, select_image_member
from transforms.types import (
    METRICS_NAMESPACE,
    READ_ERROR_REASONS,
    REASON_MISSING_IMAGE,
    Decoded,
    ErrorRow,
    Sample,
    file_facts,
)

logger = logging.getLogger(__name__)

# Every reason an `ErrorRow` leaving `DecodeImages` can carry, read and decode stages together.
ERROR_REASONS = READ_ERROR_REASONS + DECODE_ERROR_REASONS

# Output tags of `DecodeImages`.
DECODED_TAG = "decoded"
ERRORS_TAG = "errors"


def decode_sample(
    sample: Sample,
    *,
    channels: int,
    size: tuple[int, int],
    resize: str = DEFAULT_RESIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded | ErrorRow:
    """Decodes the image member of one sample, turning any failure into an `ErrorRow`.

    Args:
        sample: The sample to decode.
        channels: 1 or 3, see `pixeldensity.decoding.decode_image`.
        size: Output (height, width).
        resize: "center_crop", "stretch" or "pad".
        max_pixels: Largest accepted width * height of the file.

    Returns:
        `Decoded` on success. Otherwise an `ErrorRow` whose reason is "missing_image", the
        `DecodeError` reason, or "decode_failed" (with the exception type in the message) for
        any unexpected exception.
    """
    member = select_image_member(sample.members)
    if member is None:
        return ErrorRow(
            sample.shard,
            sample.key,
            None,
            REASON_MISSING_IMAGE,
            f"sample has members {sorted(sample.members)} but none of {IMAGE_EXTENSIONS}",
        )

    try:
        decoded = decode_image(
            sample.members[member],
            channels=channels,
            size=size,
            resize=resize,
            max_pixels=max_pixels,
        )
    except DecodeError as error:
        return ErrorRow(sample.shard, sample.key, member, error.reason, error.message)
    except Exception as error:
        # A decoder bug must cost one row, not the bundle; the traceback goes to the log.
        logger.warning(
            "unexpected error decoding %s in %s", sample.key, sample.shard, exc_info=True
        )
        message = f"unexpected {type(error).__name__}: {error}"
        return ErrorRow(sample.shard, sample.key, member, REASON_DECODE_FAILED, message)

    return Decoded(
        shard=sample.shard,
        key=sample.key,
        member=member,
        image=decoded.image,
        **file_facts(decoded),
    )


class _DecodeFn(beam.DoFn):
    """Decodes samples to the main output and sends error rows to the errors output."""

    def __init__(self, channels: int, size: tuple[int, int], resize: str, max_pixels: int):
        self._options = {
            "channels": channels,
            "size": size,
            "resize": resize,
            "max_pixels": max_pixels,
        }
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "decoded")
        self._error_counters = {}

    def process(self, element: Sample | ErrorRow):
        """Yields a `Decoded` on the main output or an `ErrorRow` on the errors output."""
        # Rows that already failed upstream pass through, counted there (read_errors).
        if isinstance(element, ErrorRow):
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, element)
            return

        result = decode_sample(element, **self._options)
        if isinstance(result, ErrorRow):
            self._count_error(result.reason)
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, result)
        else:
            self._decoded.inc()
            yield result

    def _count_error(self, reason: str) -> None:
        """Increments the counter `decode_errors_<reason>`."""
        if reason not in self._error_counters:
            name = f"decode_errors_{reason}"
            self._error_counters[reason] = Metrics.counter(METRICS_NAMESPACE, name)
        self._error_counters[reason].inc()


class DecodeImages(beam.PTransform):
    """Decodes each sample's image to uint8 (C, H, W) by the shared decode policy.

    Input: a PCollection of `Sample` and `ErrorRow` (as `ReadImageShards` produces).
    Output: tagged outputs `decoded`, a PCollection of `Decoded`, and `errors`, a PCollection
    of `ErrorRow` holding both the decode failures and the error rows that came in. Every input
    element leaves on exactly one of them. Use `result.decoded` and `result.errors`.

    Counters (namespace "pixeldensity"): `decoded`, and `decode_errors_<reason>` per
    failure reason (incoming error rows are not counted again).
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int],
        *,
        resize: str = DEFAULT_RESIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """Creates the transform.

        Args:
            channels: 1 (greyscale) or 3 (RGB).
            size: Output (height, width), the model's image size.
            resize: "center_crop" (default), "stretch" or "pad", see
                `pixeldensity.decoding.decode_image`.
            max_pixels: Files with more pixels than this are rejected as decompression bombs.

        Raises:
            ValueError: If an option is invalid.
        """
        super().__init__()
        check_decode_options(channels=channels, size=size, resize=resize, max_pixels=max_pixels)
        self._fn = _DecodeFn(channels, tuple(size), resize, max_pixels)

    def expand(self, elements):
        """Applies the decode DoFn with its two outputs."""
        return elements | "Decode" >> beam.ParDo(self._fn).with_outputs(
            ERRORS_TAG, main=DECODED_TAG
        )
