"""Beam stages of the scoring pipeline: read shards, decode images, and the element types.

Model maths lives in `pixeldensity`; these transforms only move data through it.
"""

from transforms.decode import DecodeImages
from transforms.shards import ReadImageShards
from transforms.types import Decoded, ErrorRow, Sample

__all__ = [
    "DecodeImages",
    "Decoded",
    "ErrorRow",
    "ReadImageShards",
    "Sample",
]
