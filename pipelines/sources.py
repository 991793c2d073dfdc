"""Readers of the image sources `make_shards` turns into WebDataset shards.

Four kinds of source, each with random access by index and a fixed, documented order:

- a folder tree of image files (`FolderSource`): every file whose extension Pillow registers,
  sorted by relative path; optional class labels from the first sub-folder names;
- IDX files of the MNIST family, gzipped or not (`read_idx`, `idx_source`), in file order;
- NumPy `.npz` archives with the image and label arrays named by key (`npz_source`);
- zip archives of image files (`ZipSource`), sorted by member name, labels as for folders.

A source yields `SourceRecord`s: either the encoded bytes of an image file or a uint8 pixel
array, with its label and where it came from. Encoding to PNG happens in `make_shards`.
"""

from __future__ import annotations

import fnmatch
import gzip
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

FORMATS = ("folder", "idx", "npz", "zip")

# IDX type byte -> numpy dtype (big-endian where wider than a byte), from LeCun's format notes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class SourceRecord:
    """One image read from a source.

    Attributes:
        index: position of the image in the source's own order (0-based).
        source: where it came from: a relative file path, or "file#index" for arrays.
        data: the encoded bytes of an image file (folder and zip sources), else None.
        pixels: uint8 (H, W) or (H, W, C) pixels (IDX and npz sources), else None.
        label: the integer class label, or None when the source has none.
        class_name: the class name (sub-folder name) for folder and zip sources, else None.
    """

    index: int
    source: str
    data: bytes | None = None
    pixels: np.ndarray | None = None
    label: int | None = None
    class_name: str | None = None


class ImageSource(Protocol):
    """What `make_shards` reads: a sized, randomly accessible sequence of records."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> SourceRecord:
        """Returns the record at `index`, 0 <= index < len(self)."""
        ...


class ArraySource:
    """Images held in a uint8 array (N, H, W), (N, H, W, C) or (N, C, H, W), C in {1, 3}.

    Args:
        images: the image array; channels-first arrays are moved to channels-last.
        labels: optional (N,) integer labels.
        name: the file name used in each record's `source` ("name#index").
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, name: str):
        self.images = _to_channels_last(images, name)
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            if len(labels) != len(self.images):
                raise ValueError(
                    f"{name}: {len(self.images)} images but {len(labels)} labels; "
                    "the label array must have one entry per image"
                )
        self.labels = labels
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> SourceRecord:
        """Returns image `index` as (H, W) or (H, W, C) uint8 pixels with its label."""
        pixels = self.images[index]
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        label = None if self.labels is None else int(self.labels[index])
        return SourceRecord(
            index=index,
            source=f"{self.name}#{index}",
            pixels=np.ascontiguousarray(pixels),
            label=label,
        )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (MNIST layout), gzipped or not; the compression is detected.

    Args:
        path: the IDX file.

    Returns:
        A writable array with the dimensions the header declares, e.g. (N, 28, 28) uint8
        images or (N,) uint8 labels, in native byte order.

    Raises:
        ValueError: the file is not IDX (bad magic, unknown type, or a size that does not
            match its header).
    """
    raw = Path(path).read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex()}; expected 0000 followed by "
            f"a type byte in {sorted(hex(t) for t in _IDX_DTYPES)} and a dimension count)"
        )
    dtype, num_dims = _IDX_DTYPES[raw[2]], raw[3]
    header_bytes = 4 + 4 * num_dims
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    expected_bytes = header_bytes + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected_bytes:
        raise ValueError(
            f"{path}: IDX header declares shape {shape} ({expected_bytes} bytes in all) "
            f"but the file holds {len(raw)} bytes"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_bytes).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


def idx_source(
    images_path: str | os.PathLike, labels_path: str | os.PathLike | None = None
) -> ArraySource:
    """Builds a source from an IDX image file and an optional IDX label file."""
    images = read_idx(images_path)
    labels = None if labels_path is None else read_idx(labels_path)
    return ArraySource(images, labels, Path(images_path).name)


def npz_source(
    path: str | os.PathLike, *, images_key: str, labels_key: str | None = None
) -> ArraySource:
    """Builds a source from arrays in a `.npz` file, e.g. `images_key="train_images"`.

    Raises:
        ValueError: a named key is not in the archive (the message lists the keys it holds).
    """
    with np.load(path, allow_pickle=False) as archive:
        available = sorted(archive.files)
        for key in (images_key, labels_key):
            if key is not None and key not in available:
                raise ValueError(f"{path}: no array named {key!r}; the archive holds {available}")
        images = archive[images_key]
        labels = None if labels_key is None else archive[labels_key]
    return ArraySource(images, labels, Path(path).name)


class FolderSource:
    """Image files under a folder, in sorted order of their paths relative to the folder.

    Args:
        root: the folder.
        labels_from_folders: label each image by its first sub-folder (`root/<class>/...`);
            labels are the indices of the sorted class names.
        include: optional glob on the relative path (e.g. "train/*"); others are left out.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        labels_from_folders: bool = False,
        include: str | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"folder source {str(root)!r} is not a directory")
        paths = sorted(
            path.relative_to(self.root).as_posix()
            for path in self.root.rglob("*")
            if path.is_file() and _is_image_name(path.name)
        )
        self.paths = _filter_paths(paths, include)
        self.labeller = _FolderLabeller(self.paths) if labels_from_folders else None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> SourceRecord:
        """Returns the bytes of file `index` with its label."""
        relative = self.paths[index]
        data = (self.root / relative).read_bytes()
        return _file_record(index, relative, data, self.labeller)


class ZipSource:
    """Image members of a zip archive, in sorted order of member names.

    The archive is opened lazily in each process that reads it, so the source can be pickled.

    Args:
        path: the zip file.
        labels_from_folders: label each image by its parent folder inside the archive
            (`split/<class>/name.jpg` gives `<class>`); labels index the sorted class names.
        include: optional glob on the member name (e.g. "test/*").
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        labels_from_folders: bool = False,
        include: str | None = None,
    ):
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as archive:
            names = sorted(
                info.filename
                for info in archive.infolist()
                if not info.is_dir() and _is_image_name(info.filename)
            )
        self.paths = _filter_paths(names, include)
        self.labeller = _FolderLabeller(self.paths, parent=True) if labels_from_folders else None
        self._archive: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> SourceRecord:
        """Returns the bytes of member `index` with its label."""
        if self._archive is None:
            self._archive = zipfile.ZipFile(self.path)
        name = self.paths[index]
        return _file_record(index, name, self._archive.read(name), self.labeller)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_archive": None}


class _FolderLabeller:
    """Maps relative paths to (label, class name) by a folder name in the path."""

    def __init__(self, paths: list[str], *, parent: bool = False):
        self.parent = parent
        names = sorted({self.class_name(path) for path in paths})
        self.labels = {name: label for label, name in enumerate(names)}

    def class_name(self, path: str) -> str:
        """The first folder of `path` (or its parent folder when `parent` is set); "" if none."""
        parts = path.split("/")[:-1]
        if not parts:
            return ""
        return parts[-1] if self.parent else parts[0]

    def __call__(self, path: str) -> tuple[int, str]:
        name = self.class_name(path)
        return self.labels[name], name


def _file_record(
    index: int, relative: str, data: bytes, labeller: _FolderLabeller | None
) -> SourceRecord:
    label, class_name = labeller(relative) if labeller is not None else (None, None)
    return SourceRecord(index=index, source=relative, data=data, label=label, class_name=class_name)


def _to_channels_last(images: np.ndarray, name: str) -> np.ndarray:
    """Checks an image array and returns it as (N, H, W) or (N, H, W, C) uint8."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{name}: images must be uint8, got dtype {images.dtype}")
    if images.ndim == 3:
        return images
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images.transpose(0, 2, 3, 1)
    raise ValueError(
        f"{name}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C in "
        f"{{1, 3}}, got {images.shape}"
    )


def _is_image_name(name: str) -> bool:
    """Whether the extension belongs to a format the decode policy opens (`ALLOWED_FORMATS`)."""
    from PIL import Image

    from pixeldensity.decoding import ALLOWED_FORMATS

    image_format = Image.registered_extensions().get(Path(name).suffix.lower())
    return image_format in ALLOWED_FORMATS


def _filter_paths(paths: list[str], include: str | None) -> list[str]:
    if include is None:
        return paths
    return [path for path in paths if fnmatch.fnmatchcase(path, include)]
