"""Element types that flow between the Beam stages of the scoring pipeline.

Reading yields `Sample` (or `ErrorRow` for what could not be read), decoding yields `Decoded`
(or `ErrorRow`). They are frozen dataclasses rather than NamedTuples on purpose: Beam infers a
schema (and a RowCoder) for annotated NamedTuples, which cannot hold numpy arrays or byte
dictionaries, whereas dataclasses go through Beam's general pickling coder.
"""

import dataclasses
from typing import Any

import numpy as np

# Beam metrics namespace for every counter the pipeline reports.
METRICS_NAMESPACE = "pixeldensity"

REASON_MISSING_IMAGE = "missing_image"
REASON_DUPLICATE_MEMBER = "duplicate_member"
REASON_TRUNCATED_SHARD = "truncated_shard"
REASON_UNREADABLE_SHARD = "unreadable_shard"

# Every `ErrorRow.reason` the read stage produces. The decode stage adds
# `pixeldensity.decoding.DECODE_ERROR_REASONS`.
READ_ERROR_REASONS = (
    REASON_MISSING_IMAGE,
    REASON_DUPLICATE_MEMBER,
    REASON_TRUNCATED_SHARD,
    REASON_UNREADABLE_SHARD,
)


# What an image file says about itself. `Decoded`, `Scored` and `ScoreError` each carry these
# fields (flat, so that Beam elements stay plain), and `file_facts` copies them between types.
FILE_FACTS = (
    "original_width",
    "original_height",
    "original_mode",
    "original_format",
    "is_animated",
    "num_frames",
)


def file_facts(source: Any) -> dict[str, Any]:
    """Returns the `FILE_FACTS` attributes of `source` (a `Decoded`, `DecodedImage`, ...)."""
    return {name: getattr(source, name) for name in FILE_FACTS}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One WebDataset sample: the tar members that share a key.

    Attributes:
        shard: Path or URL of the shard, as matched.
        key: The member path up to the first dot of its base name, e.g. "dir/000123".
        members: Member contents by extension (lower-cased text after that first dot),
            e.g. {"png": b"...", "cls": b"3"}.
    """

    shard: str
    key: str
    members: dict[str, bytes]


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    """A sample (or a whole shard) that ends as an error row instead of a score.

    Attributes:
        shard: Path or URL of the shard.
        key: The sample key, or None when the error concerns a shard whose samples could not
            be told apart (an unreadable shard).
        member: The member's extension within the sample (e.g. "jpg") when one member is at
            fault, else None.
        reason: A short machine-readable code: one of `READ_ERROR_REASONS` or
            `pixeldensity.decoding.DECODE_ERROR_REASONS`.
        message: A human-readable description, with byte offsets for shard errors.
    """

    shard: str
    key: str | None
    member: str | None
    reason: str
    message: str


@dataclasses.dataclass(frozen=True, eq=False)
class Decoded:
    """One decoded sample, ready for batching and scoring.

    Attributes:
        shard: Path or URL of the shard.
        key: The sample key.
        member: Extension of the member that was decoded, e.g. "png".
        image: uint8 array of shape (C, H, W), values 0..255.
        original_width: Width as stored in the file, before EXIF orientation.
        original_height: Height as stored in the file, before EXIF orientation.
        original_mode: Pillow mode of the file, e.g. "RGB", "P", "I;16".
        original_format: Pillow format name, e.g. "PNG", "JPEG".
        is_animated: Whether the file holds more than one frame (the first was decoded).
        num_frames: Number of frames in the file.
    """

    shard: str
    key: str
    member: str
    image: np.ndarray
    original_width: int
    original_height: int
    original_mode: str
    original_format: str
    is_animated: bool
    num_frames: int
