"""Beam stages of the scoring pipeline: read shards, decode, score, flag, write Parquet.

Model maths lives in `pixeldensity`; these transforms only move data through it.
"""

from transforms.decode import DecodeImages
from transforms.flag import FlagOutliers
from transforms.schema import SCHEMA_VERSION, SCORES_SCHEMA
from transforms.score import DensityModelHandler, Scored, ScoreError, ScoreImages
from transforms.shards import ReadImageShards
from transforms.types import Decoded, ErrorRow, Sample
from transforms.write import WriteScores

__all__ = [
    "DecodeImages",
    "Decoded",
    "ErrorRow",
    "ReadImageShards",
    "Sample",
    # Scoring, flagging and writing.
    "DensityModelHandler",
    "FlagOutliers",
    "SCHEMA_VERSION",
    "SCORES_SCHEMA",
    "ScoreError",
    "ScoreImages",
    "Scored",
    "WriteScores",
]
