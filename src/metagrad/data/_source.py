"""Omniglot's image sources (a zip or an unzipped folder): listing, structure check and decoding.

The layout is the official one: ``<top>/<Alphabet>/characterKK/NNNN_DD.png`` with ``top`` one of
``images_background`` / ``images_evaluation``, ``NNNN`` the character's global id and ``DD`` the
drawing (01 .. 20). Images are decoded with Pillow: the 1-bit 105x105 drawing is converted to ``L``,
resized to 28x28 with ``BOX`` (area averaging: no ringing, and twice as fast as ``LANCZOS``), then
inverted so that the background is 0 and a full stroke 255.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm  # type: ignore[import-untyped]

from metagrad.data._files import check_member

TOPS = ("images_background", "images_evaluation")
DRAWINGS = 20
SIZE = 28
RESAMPLE = "box"
_CHARACTER = re.compile(r"character(\d+)")
_DRAWING = re.compile(r"(\d+)_(\d+)\.png")
_BOX = getattr(Image, "Resampling", Image).BOX  # Pillow < 9.1 has no Image.Resampling


class CorruptSourceError(ValueError):
    """A source file (``path``) could not be read or decoded: bad zip, bad CRC, not a PNG."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class Entry(NamedTuple):
    """One character of a source: its alphabet, folder name, global id and drawing files."""

    alphabet: str
    name: str
    id: int
    files: tuple[str, ...]  # paths relative to the source's top folder, drawing 01 first


@dataclass(frozen=True)
class Source:
    """One half of Omniglot: ``path`` is the zip or the folder named ``top``."""

    top: str
    path: Path

    @property
    def is_zip(self) -> bool:
        return self.path.suffix == ".zip"

    def fingerprint(self) -> str:
        """Sizes and modification times of the source's files (changes when the source does)."""
        if self.is_zip:
            st = self.path.stat()
            return f"{self.top}.zip:{st.st_size}:{st.st_mtime_ns}"
        digest = hashlib.sha256()
        for rel in self.members():
            st = (self.path / rel).stat()
            digest.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return f"{self.top}/:{digest.hexdigest()}"

    def members(self) -> list[str]:
        """Every PNG's path relative to the top folder, sorted."""
        if self.is_zip:
            with _open_zip(self.path) as archive:
                names = archive.namelist()
            prefix = self.top + "/"
            rels = []
            for name in names:
                path = check_member(name).as_posix()
                if path.lower().endswith(".png"):
                    if not path.startswith(prefix):
                        raise ValueError(
                            f"{self.path}: entry {name!r} is outside the top folder {prefix}; "
                            "use the official zip"
                        )
                    rels.append(path[len(prefix) :])
            return sorted(rels)
        rels = []
        for dirpath, _, files in os.walk(self.path):
            rel_dir = Path(dirpath).relative_to(self.path).as_posix()
            rels += [f"{rel_dir}/{f}" for f in files if f.lower().endswith(".png")]
        return sorted(rels)

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], bytes]]:
        """A function reading one member's bytes, valid inside the ``with`` block."""
        if self.is_zip:
            with _open_zip(self.path) as archive:
                yield lambda rel: archive.read(f"{self.top}/{rel}")
        else:
            yield lambda rel: (self.path / rel).read_bytes()


@contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise CorruptSourceError(f"{path} is not a valid zip file ({err})", path) from err
    with archive:
        yield archive


def parse_layout(source: Source, members: Sequence[str]) -> list[Entry]:
    """Group PNG paths into characters, checking the official structure; ``ValueError`` if not."""
    where = f"{source.path}"
    fix = (
        "the copy looks incomplete or altered: use the official zips (images_background.zip, "
        "images_evaluation.zip) or their unzipped folders"
    )
    groups: dict[tuple[str, str], list[str]] = {}
    for rel in members:
        parts = rel.split("/")
        if len(parts) != 3 or not _CHARACTER.fullmatch(parts[1]):
            raise ValueError(
                f"{where}: unexpected file {rel!r}; expected Alphabet/characterKK/NNNN_DD.png; "
                + fix
            )
        groups.setdefault((parts[0], parts[1]), []).append(rel)
    if not groups:
        raise ValueError(f"{where} holds no Alphabet/characterKK/NNNN_DD.png drawings; {fix}")
    entries = []
    for (alphabet, name), files in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        parsed = [_DRAWING.fullmatch(f.rsplit("/", 1)[1]) for f in files]
        ids = {int(m.group(1)) for m in parsed if m}
        drawings = sorted(_drawings_of(parsed))
        if None in parsed or len(ids) != 1 or drawings != list(range(1, DRAWINGS + 1)):
            raise ValueError(
                f"{where}: {alphabet}/{name} must hold {DRAWINGS} drawings NNNN_01.png .. "
                f"NNNN_{DRAWINGS}.png of one id NNNN, found {len(files)} files; {fix}"
            )
        ordered = [f for _, f in sorted(zip(_drawings_of(parsed), files, strict=True))]
        entries.append(Entry(alphabet, name, ids.pop(), tuple(ordered)))
    return entries


def _drawings_of(parsed: Sequence[re.Match[str] | None]) -> list[int]:
    return [int(m.group(2)) if m else -1 for m in parsed]


def _order(key: tuple[str, str]) -> tuple[str, int]:
    alphabet, name = key
    return alphabet, int(_CHARACTER.fullmatch(name)[1])  # type: ignore[index]


def decode_png(data: bytes, size: int = SIZE) -> np.ndarray:
    """One drawing as ``(size, size)`` uint8 with background 0 and stroke 255 (``BOX`` resize)."""
    with Image.open(io.BytesIO(data)) as image:
        gray = image.convert("L")
    if gray.size != (size, size):
        gray = gray.resize((size, size), _BOX)
    return 255 - np.asarray(gray, dtype=np.uint8)


_ZIPS: dict[str, zipfile.ZipFile] = {}  # per worker process: zips opened once


def _decode_job(job: tuple[str, str, Sequence[str]]) -> tuple[np.ndarray | None, str | None]:
    """Decode one character's drawings in a worker; return ``(images, None)`` or ``(None, why)``."""
    top, path, rels = job
    rel = rels[0]
    try:
        if path.endswith(".zip"):
            archive = _ZIPS.get(path) or _ZIPS.setdefault(path, zipfile.ZipFile(path))
            read = lambda r: archive.read(f"{top}/{r}")  # noqa: E731
        else:
            read = lambda r: Path(path, r).read_bytes()  # noqa: E731
        out = np.empty((len(rels), SIZE, SIZE), dtype=np.uint8)
        for i, rel in enumerate(rels):
            out[i] = decode_png(read(rel))
        return out, None
    except Exception as err:  # reported by the parent with the file's name
        return None, f"{rel}: {type(err).__name__}: {err}"


def decode_all(sources: Sequence[tuple[Source, list[Entry]]], workers: int) -> np.ndarray:
    """Decode every drawing into ``(characters, DRAWINGS, SIZE, SIZE)`` uint8, with a progress bar.

    Raises :class:`CorruptSourceError` naming the source and file when one cannot be decoded.
    """
    jobs = [(s.top, str(s.path), e.files) for s, entries in sources for e in entries]
    owners = [s for s, entries in sources for _ in entries]
    out = np.empty((len(jobs), DRAWINGS, SIZE, SIZE), dtype=np.uint8)
    bar = tqdm(total=len(jobs) * DRAWINGS, desc="decoding Omniglot", unit="img", file=sys.stderr)
    with bar:
        if workers > 1 and len(jobs) > 50:
            with get_context().Pool(workers) as pool:
                results = pool.imap(_decode_job, jobs, chunksize=16)
                _collect(results, owners, out, bar)
        else:
            try:
                _collect(map(_decode_job, jobs), owners, out, bar)
            finally:
                while _ZIPS:
                    _ZIPS.popitem()[1].close()
    return out


def _collect(results, owners: list[Source], out: np.ndarray, bar: tqdm) -> None:
    for i, (images, why) in enumerate(results):
        if images is None:
            raise CorruptSourceError(f"{owners[i].path}: cannot decode {why}", owners[i].path)
        out[i] = images
        bar.update(DRAWINGS)
