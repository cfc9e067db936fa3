"""Image-folder trees ``train/<class>/*`` and ``test/<class>/*``, as a directory or a zip."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from .bounded import BoundedReader, SizeLimit, open_bounded
from .dataset import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGE_FILE_LIMIT = SizeLimit(2**20, "a 32x32 image takes a few KB in any of these formats")
MAX_IMAGE_PIXELS = 2**20  # 1024x1024; checked from the header, before decoding


def _image_entries(names: Iterable[str], where: str) -> dict[str, list[tuple[str, str]]]:
    """Group ``.../<split>/<class>/<file>`` paths into sorted ``(class, path)`` lists per split."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for name in names:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if len(parts) < 3 or any(p.startswith((".", "__MACOSX")) for p in parts):
            continue
        split, cls, file = parts[-3:]
        if split in splits and file.lower().endswith(IMAGE_SUFFIXES):
            splits[split].append((cls, name))
    for split, entries in splits.items():
        if not entries:
            raise FileNotFoundError(f"radgrad: {where} has no images under {split}/<class>/")
        entries.sort()
    return splits


def _decode_images(entries: list[tuple[str, str]], read: Callable[[str], bytes], desc: str) -> np.ndarray:
    """Decode images to one uint8 (n, H, W, 3) array, with a progress bar."""
    from PIL import Image
    from tqdm import tqdm

    images: list[np.ndarray] = []
    for _, name in tqdm(entries, desc=desc, unit="img", disable=None, leave=False):
        try:
            with Image.open(io.BytesIO(read(name))) as im:
                # The size comes from the header: refuse before decoding anything large.
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(
                        f"radgrad: {desc}: image {name} is {im.width}x{im.height}, "
                        f"more than the {MAX_IMAGE_PIXELS:,} pixels allowed"
                    )
                if images and (im.height, im.width) != images[0].shape[:2]:
                    shape = (im.height, im.width, 3)
                    raise ValueError(f"radgrad: {desc}: image {name} is {shape}, others {images[0].shape}")
                images.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise ValueError(f"radgrad: {desc}: cannot decode image {name} ({e})") from e
    return np.stack(images)


def image_folder_dataset(names: Iterable[str], read: Callable[[str], bytes], where: str) -> Dataset:
    """Build a dataset from an image-folder tree; class names are the sorted train folders.

    Args:
        names: the tree's file paths, ``/``-separated, relative to its root.
        read: returns the bytes of one of ``names``.
        where: the tree's location, used in messages.
    """
    splits = _image_entries(names, where)
    classes = tuple(sorted({cls for cls, _ in splits["train"]}))
    unknown = sorted({cls for cls, _ in splits["test"]} - set(classes))
    if unknown:
        raise ValueError(f"radgrad: {where}: test classes {unknown} have no train folder")
    index = {cls: i for i, cls in enumerate(classes)}
    arrays: dict[str, np.ndarray] = {}
    for split, entries in splits.items():
        arrays[f"{split}_x"] = _decode_images(entries, read, f"{where} {split}")
        arrays[f"{split}_y"] = np.array([index[cls] for cls, _ in entries], dtype=np.int64)
    return Dataset(classes=classes, **arrays)


def _escapes(name: str) -> bool:
    """Whether zip member ``name`` is absolute or climbs with ``..`` (in either slash style)."""
    posix = PurePosixPath(name.replace("\\", "/"))
    return posix.is_absolute() or ".." in posix.parts or bool(PureWindowsPath(name).drive)


def zip_dataset(path: Path) -> Dataset:
    """Build a dataset from an image-folder tree stored in the zip ``path``.

    Raises:
        ValueError: if a member's name is absolute or contains ``..``: such an
            archive was not made from one folder, so none of it is trusted.
    """
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        bad = [n for n in names if _escapes(n)]
        if bad:
            raise ValueError(
                f"radgrad: {path}: zip member {bad[0]!r} has an absolute path or a '..' component; "
                "only paths relative to the archive's root, like train/<class>/<file>, are allowed"
            )

        def read(name: str) -> bytes:
            with BoundedReader(zf.open(name), IMAGE_FILE_LIMIT, f"{path}/{name}") as f:
                return f.read()

        return image_folder_dataset(names, read, str(path))


def dir_files(folder: Path) -> list[Path]:
    """Every file under ``folder/train`` and ``folder/test``, sorted."""
    return sorted(p for split in ("train", "test") for p in (folder / split).rglob("*") if p.is_file())


def dir_dataset(folder: Path, files: list[Path]) -> Dataset:
    """Build a dataset from an image-folder tree on disk, given its :func:`dir_files`."""

    def read(name: str) -> bytes:
        with open_bounded(folder / name, IMAGE_FILE_LIMIT, gunzip=False) as f:
            return f.read()

    return image_folder_dataset([p.relative_to(folder).as_posix() for p in files], read, str(folder))
