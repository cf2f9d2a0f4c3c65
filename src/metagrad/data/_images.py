"""Colour image classes decoded once and cached: the storage behind the ImageNet and CIFAR loaders.

A data set's split is one uint8 array ``(classes, per class, 3, H, W)`` (channels first, as the
models take them), the number of valid images of each class (``counts``: tiered-ImageNet's classes
differ in size, and the rows are padded to the largest) and the class names. It is decoded once
and cached as an uncompressed ``.npz`` in ``cache_dir`` (default ``$METAGRAD_CACHE``, else
``~/.cache/metagrad``), never beside the data, whose folder may be read-only; the file name holds a
key of the data folder's path and a fingerprint of the sources' names, sizes and modification
times, so a changed source is decoded again (and the stale cache removed).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm  # type: ignore[import-untyped]

from metagrad.data import _files
from metagrad.data.few_shot import ClassSet, parse_class_name

CACHE_VERSION = 1
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS  # Pillow < 9.1 has no Image.Resampling


class ColourClasses:
    """The classes of one split: ``images`` ``(classes, per class, 3, H, W)`` uint8, 255 = full.

    ``counts[c]`` images of class ``c`` are valid (``images[c, counts[c]:]`` is padding where the
    classes differ in size); ``names[c]`` is its name. :meth:`classes` gives the
    :class:`~metagrad.data.ClassSet` that :class:`~metagrad.data.FewShotSampler` samples.
    """

    image_shape: tuple[int, int, int] = (3, 84, 84)
    """``(C, H, W)`` of every image of the data set."""

    def __init__(self, arrays: dict[str, np.ndarray], root: Path, split: str) -> None:
        self.root, self.split = root, split
        self.images: torch.Tensor = torch.from_numpy(arrays["images"])
        self.counts: torch.Tensor = torch.from_numpy(arrays["counts"].astype(np.int64))
        self.names: tuple[str, ...] = tuple(str(n) for n in arrays["names"].tolist())
        self._lookup = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.split!r}: {len(self)} classes, "
            f"{int(self.counts.sum())} images of {'x'.join(map(str, self.image_shape))}, "
            f"root={self.root})"
        )

    def classes(self, names: Iterable[str] | None = None) -> ClassSet:
        """The classes ``names`` (default: all, in order); a ``/rotDDD`` suffix rotates one.

        ``ClassSet.to_json()`` gives names from which this rebuilds the same set.
        """
        chosen = self.names if names is None else tuple(names)
        parsed = [parse_class_name(name) for name in chosen]
        for base, _ in parsed:
            if base not in self._lookup:
                raise ValueError(
                    f"unknown class {base!r} in the {self.split} split of {type(self).__name__}: "
                    f"choose from its {len(self)} classes (e.g. {self.names[0]!r})"
                )
        return ClassSet(
            self.images,
            torch.tensor([self._lookup[base] for base, _ in parsed], dtype=torch.int64),
            torch.tensor([k for _, k in parsed], dtype=torch.int64),
            chosen,
            self.counts,
        )


SPLITS = ("train", "val", "test")


def split_name(split: str) -> str:
    """``split`` if it is one of :data:`SPLITS`, else ``ValueError`` naming them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return split


def load_splits(
    kind: Callable[[str | Path, str, str | Path | None], ColourClasses],
    protocols: tuple[str, ...],
    root: str | Path,
    split: str,
    rotations: bool | None,
    cache_dir: str | Path | None,
) -> dict[str, ClassSet]:
    """Every split's classes of a data set whose class split is fixed (one of ``protocols``).

    ``rotations=True`` makes each class four (turned by 0, 90, 180, 270 degrees).
    """
    if split not in protocols:
        name = getattr(kind, "__name__", "this data set")
        raise ValueError(
            f"unknown class split {split!r} for {name}: use {' or '.join(map(repr, protocols))}"
        )
    out = {}
    for s in SPLITS:
        classes = kind(root, s, cache_dir).classes()
        out[s] = classes.with_rotations((0, 1, 2, 3)) if rotations else classes
    return out


def fingerprint(paths: Sequence[Path]) -> str:
    """A digest of each file's name, size and modification time."""
    digest = hashlib.sha256()
    for path in paths:
        st = path.stat()
        digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached(
    stem: str,
    root: Path,
    stamp: str,
    decode: Callable[[], dict[str, np.ndarray]],
    cache_dir: str | Path | None,
) -> dict[str, np.ndarray]:
    """The arrays cached under ``stem`` for ``root`` if ``stamp`` matches, else ``decode()``'s.

    ``stamp`` describes the sources (see :func:`fingerprint`) and the decoding; a new one is
    written atomically and the stale ones for the same ``stem`` and root are removed. A cache
    that cannot be written (a read-only folder) is a warning, not an error.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else _files.default_cache_dir()
    stamp_digest = hashlib.sha256(f"v{CACHE_VERSION}\n{stamp}".encode()).hexdigest()
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    path = folder / f"{stem}-{key}-{stamp_digest[:16]}.npz"
    arrays = _files.read_npz(path)
    if arrays is not None and str(arrays.get("fingerprint")) == stamp_digest:
        return arrays
    arrays = decode()
    arrays["fingerprint"] = np.array(stamp_digest)
    try:
        _files.write_npz_atomic(path, arrays)
        for stale in folder.glob(f"{stem}-{key}-*.npz"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as err:
        warnings.warn(
            f"could not write the cache {path} ({err}); the next load decodes again. Set "
            "METAGRAD_CACHE or cache_dir= to a writable folder",
            stacklevel=4,
        )
    return arrays


def slots(labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's place in its class, ``(slot per image, count per class)``, in file order."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=n_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.empty(len(labels), dtype=np.int64)
    slot[order] = np.arange(len(labels)) - np.repeat(starts, counts)
    return slot, counts


def grouped(
    images: np.ndarray, labels: np.ndarray, names: Sequence[str], **extra: np.ndarray
) -> dict[str, np.ndarray]:
    """``(N, H, W, 3)`` images and their labels as the cached arrays, classes in ``names`` order."""
    slot, counts = slots(labels, len(names))
    out = np.zeros((len(names), int(counts.max()), 3, *images.shape[1:3]), dtype=np.uint8)
    out[labels, slot] = images.transpose(0, 3, 1, 2)
    return {"images": out, "counts": counts, "names": np.array(names), **extra}


def decode_image(data: bytes | np.ndarray, size: int) -> np.ndarray:
    """A PNG or JPEG as ``(size, size, 3)`` RGB uint8, resized with ``LANCZOS`` if it is not."""
    raw = data if isinstance(data, bytes) else data.tobytes()
    with Image.open(io.BytesIO(raw)) as image:
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), _LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def _decode_job(job: tuple[bytes | np.ndarray | str, int]) -> tuple[np.ndarray | None, str | None]:
    """Decode one image (its bytes, or a file's path) in a worker: ``(image, None)``, or why not."""
    source, size = job
    try:
        data = Path(source).read_bytes() if isinstance(source, str) else source
        return decode_image(data, size), None
    except Exception as err:  # reported by the parent with the image's name
        return None, " ".join(f"{type(err).__name__}: {err}".split())[:200]


def decode_into(
    out: np.ndarray,
    places: tuple[np.ndarray, np.ndarray],
    sources: Sequence[bytes | np.ndarray | str],
    names: Callable[[int], str],
    desc: str,
    workers: int,
) -> None:
    """Decode image ``i`` of ``sources`` (its bytes, or a path) into ``out[rows[i], slots[i]]``.

    ``out`` is ``(classes, per class, 3, size, size)``; ``names(i)`` names image ``i`` in the
    ``ValueError`` raised when it cannot be decoded. Worker processes where there are many.
    """
    rows, slot = places
    size = out.shape[-1]
    jobs = ((s, size) for s in sources)
    bar = tqdm(total=len(sources), desc=desc, unit="img", file=sys.stderr)
    with bar:
        if workers > 1 and len(sources) > 500:
            with get_context().Pool(workers) as pool:
                _place(pool.imap(_decode_job, jobs, chunksize=64), out, rows, slot, names, bar)
        else:
            _place(map(_decode_job, jobs), out, rows, slot, names, bar)


def _place(results, out, rows, slot, names, bar) -> None:  # type: ignore[no-untyped-def]
    for i, (image, why) in enumerate(results):
        if image is None:
            raise ValueError(f"{names(i)} cannot be decoded as an image ({why}); replace it")
        out[rows[i], slot[i]] = image.transpose(2, 0, 1)
        bar.update(1)


def npz_rows(
    path: Path, key: str, shape: tuple[int, ...], fix: str, rows: int = 4096
) -> Iterator[np.ndarray]:
    """The uint8 array ``key`` of an ``.npz``, which must have ``shape``, ``rows`` at a time.

    Read from the archive in pieces (the header parsed by NumPy's format reader, the data read as
    raw bytes: no pickle is ever involved), so a large split never sits in memory twice.
    ``ValueError`` ending with ``fix`` if the file or the array is not as expected.
    """
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            found, fortran, dtype = header(f)
            if fortran or dtype != np.uint8 or tuple(found) != shape:
                raise ValueError(f"{path}: {key} is {dtype} {tuple(found)}; {fix}")
            step = int(np.prod(shape[1:]))
            for start in range(0, shape[0], rows):
                count = min(rows, shape[0] - start)
                chunk = f.read(count * step)
                if len(chunk) != count * step:
                    raise ValueError(f"{path} is truncated; {fix}")
                yield np.frombuffer(chunk, dtype=np.uint8).reshape(count, *shape[1:])
    except KeyError:
        raise ValueError(f"{path} holds no array {key!r}; {fix}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz ({err}): it is corrupt; {fix}") from err


def workers() -> int:
    """Decoding processes: the usable cores, at most 8."""
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, 8))
