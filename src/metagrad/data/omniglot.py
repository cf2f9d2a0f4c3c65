"""Omniglot (Lake et al., 2015): 1623 handwritten characters of 50 alphabets, 20 drawings each.

Decoded once from the official zips (or the unzipped folders) and cached as 28x28 uint8 arrays in
one ``.npz``; later loads read only the cache. See :class:`Omniglot`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import NamedTuple, NoReturn

import numpy as np
import torch
from torch import Tensor

from metagrad.data import _files, _source, _splits
from metagrad.data._source import DRAWINGS, RESAMPLE, SIZE, TOPS, CorruptSourceError, Source
from metagrad.data.few_shot import ClassSet, class_name, parse_class_name

URLS = {
    top: f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{top}.zip"
    for top in TOPS
}
"""Where ``download=True`` fetches each zip (override it to use a mirror)."""
MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
"""The published md5 of each zip, checked after a download (local copies: by structure)."""
CACHE_VERSION = 1


class Character(NamedTuple):
    """One character: ``images`` is ``(20, 1, 28, 28)`` float32 in [0, 1], 1 = stroke."""

    alphabet: str
    name: str
    id: int
    background: bool
    images: Tensor


class Omniglot:
    """The 1623 Omniglot characters, as one uint8 tensor ``images`` of shape ``(1623, 20, 28, 28)``.

    ``root`` holds ``images_background.zip`` and ``images_evaluation.zip``, or the unzipped folders
    ``images_background/`` and ``images_evaluation/``; where both a zip and its folder are present
    the zip is read (checking the cache then takes one ``stat``, not one per drawing). A local copy
    is checked by its structure (alphabets, ``characterKK`` folders, 20 drawings ``NNNN_DD.png``
    each), not by md5. With ``download=True`` a missing zip is fetched from :data:`URLS`, its md5
    checked against :data:`MD5`, and extracted safely into ``root`` (entries with absolute paths or
    ``..`` are refused).

    The drawings are decoded once (Pillow; 105x105 1-bit -> ``L`` -> 28x28 ``BOX`` resize, inverted
    so that 255 = stroke) and cached in ``cache_dir`` (default ``$METAGRAD_CACHE``, else
    ``~/.cache/metagrad``) as ``omniglot-<root key>-<fingerprint>.npz``; the fingerprint covers the
    sources' sizes and modification times, so a changed source is decoded again. Characters are
    ordered background first, then by alphabet name and character number.

    Example::

        ds = Omniglot(os.environ["METAGRAD_OMNIGLOT"])
        len(ds), ds.alphabets[:2], ds[0].images.shape   # 1623, (...), (20, 1, 28, 28)
        splits = ds.split("maml", seed=0)               # {"train": ClassSet, ...}
    """

    def __init__(
        self, root: str | Path, download: bool = False, cache_dir: str | Path | None = None
    ) -> None:
        self.root = Path(root).expanduser()
        self._sources = _locate(self.root, download)
        cache = (
            Path(cache_dir).expanduser() if cache_dir is not None else _files.default_cache_dir()
        )
        arrays = _load(self._sources, self.root, cache)
        self.images: Tensor = torch.from_numpy(arrays["images"])
        self.alphabet: tuple[str, ...] = tuple(arrays["alphabet"].tolist())
        self.names: tuple[str, ...] = tuple(arrays["character"].tolist())
        self.ids: tuple[int, ...] = tuple(arrays["ids"].tolist())
        self.background: tuple[bool, ...] = tuple(arrays["background"].tolist())
        self.alphabets: tuple[str, ...] = tuple(dict.fromkeys(self.alphabet))
        self._lookup = {name[: -len("/rot000")]: i for i, name in enumerate(self.class_names())}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Character:
        images = self.images[i].unsqueeze(1).to(torch.float32) / 255.0
        return Character(self.alphabet[i], self.names[i], self.ids[i], self.background[i], images)

    def __repr__(self) -> str:
        return (
            f"Omniglot({len(self)} characters, {len(self.alphabets)} alphabets, root={self.root})"
        )

    def characters(self, alphabet: str) -> list[int]:
        """Indices of an alphabet's characters, in character order."""
        found = [i for i, a in enumerate(self.alphabet) if a == alphabet]
        if not found:
            raise ValueError(f"unknown alphabet {alphabet!r}; known: {', '.join(self.alphabets)}")
        return found

    def classes(self, names: Iterable[str]) -> ClassSet:
        """The classes named ``"Alphabet/characterNN/rotDDD"`` (no suffix: ``rot000``), in order."""
        parsed = [parse_class_name(name) for name in names]
        for base, _ in parsed:
            if base not in self._lookup:
                raise ValueError(
                    f"unknown class {base!r}: expected 'Alphabet/characterNN/rotDDD' with an "
                    f"alphabet and character of this data set (e.g. {self.class_names()[0]!r})"
                )
        return ClassSet(
            self.images,
            torch.tensor([self._lookup[base] for base, _ in parsed], dtype=torch.int64),
            torch.tensor([k for _, k in parsed], dtype=torch.int64),
            tuple(class_name(base, k) for base, k in parsed),
        )

    def class_names(self, indices: Iterable[int] | None = None) -> list[str]:
        """``"Alphabet/characterNN/rot000"`` for the given characters (default: all)."""
        chosen = range(len(self)) if indices is None else indices
        return [f"{self.alphabet[i]}/{self.names[i]}/rot000" for i in chosen]

    def split(
        self, protocol: str, *, seed: int = 0, rotations: bool | Collection[str] | None = None
    ) -> dict[str, ClassSet]:
        """The ``train`` / ``val`` / ``test`` / ``trainval`` class sets of a published protocol.

        - ``"maml"`` (Finn et al., 2017): characters shuffled with ``seed``: 1100 train, 100 val,
          the other 423 test. Default rotations: on train (and trainval) only, each rotation a new
          class (Santoro et al., 2016).
        - ``"vinyals"`` (Vinyals et al., 2016, as released with Prototypical Networks): the
          published lists (``root/splits/vinyals/*.txt`` if present, else the copy shipped with
          metagrad), 1028 / 172 / 423 characters; the lists name every rotation, so by default
          all splits are rotated.
        - ``"lake"`` (Lake et al., 2015): background alphabets for training, evaluation alphabets
          (659 characters) for test; ``val`` is carved out of the background: a sixth of its
          alphabets (5 of 30) drawn with ``seed``. Default: no rotations.

        ``rotations``: ``None`` takes the protocol's default; ``True`` / ``False`` turn rotations
        on / off for every split; a collection of split names turns them on for those only.
        ``trainval`` is train and val together, rotated like ``train``.
        """
        chosen = _splits.split_characters(self, protocol, seed)
        default = _splits.DEFAULT_ROTATIONS[protocol]
        rotated = default if rotations is None else rotations
        out = {}
        for name, classes in chosen.items():
            on = rotated if isinstance(rotated, bool) else name in rotated
            out[name] = self.classes(classes).with_rotations((0, 1, 2, 3) if on else (0,))
        return out

    def read_pngs(self, items: Iterable[tuple[int, int]]) -> list[bytes]:
        """The original PNG bytes of each ``(character index, drawing)`` pair (drawing 0-based)."""
        items = list(items)
        out: list[bytes] = [b""] * len(items)
        for top, source in self._sources.items():
            with source.reader() as read:
                for n, (i, d) in enumerate(items):
                    if self.background[i] == (top == TOPS[0]):
                        folder = f"{self.alphabet[i]}/{self.names[i]}"
                        out[n] = read(f"{folder}/{self.ids[i]:04d}_{d + 1:02d}.png")
        return out


def _locate(root: Path, download: bool) -> dict[str, Source]:
    """The source of each half: ``root/top.zip`` if present, else the folder ``root/top``."""
    found, missing = {}, []
    for top in TOPS:
        if (root / f"{top}.zip").is_file():
            found[top] = Source(top, root / f"{top}.zip")
        elif (root / top).is_dir():
            found[top] = Source(top, root / top)
        elif download:
            root.mkdir(parents=True, exist_ok=True)
            found[top] = Source(top, _download(root, top))
        else:
            missing.append(top)
    if missing:
        wanted = " and ".join(f"{t}.zip (or the folder {t}/)" for t in missing)
        raise FileNotFoundError(
            f"Omniglot not found: expected {wanted} in {root.resolve()}. Fetch them from "
            f"{URLS[missing[0]].rsplit('/', 1)[0]}/ into that folder, or point --data (Python: "
            "root) at a folder holding the official zips or their unzipped folders "
            "(Alphabet/characterKK/NNNN_DD.png); the shared copy's path is in $METAGRAD_OMNIGLOT"
        )
    return found


def _download(root: Path, top: str) -> Path:
    """Fetch and check ``top.zip``, extract it safely, return its path; a bad one is moved aside."""
    path = _files.download(URLS[top], root / f"{top}.zip", MD5[top])
    try:
        _files.safe_extract(path, root, top)
        return path
    except (ValueError, zipfile.BadZipFile) as err:
        where = _files.move_aside(path)
        raise CorruptSourceError(
            f"{path} cannot be extracted safely ({err}): {where} and will not be used", path
        ) from err


def _load(sources: dict[str, Source], root: Path, cache_dir: Path) -> dict[str, np.ndarray]:
    """The cached arrays if the cache matches the sources' fingerprint, else decode and cache."""
    stamp = "\n".join(
        [f"v{CACHE_VERSION}:{SIZE}:{RESAMPLE}"] + [s.fingerprint() for s in sources.values()]
    )
    fingerprint = hashlib.sha256(stamp.encode()).hexdigest()
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    path = cache_dir / f"omniglot-{key}-{fingerprint[:16]}.npz"
    arrays = _files.read_npz(path)
    if arrays is not None and str(arrays.get("fingerprint")) == fingerprint:
        return arrays
    arrays = _decode(sources)
    arrays["fingerprint"] = np.array(fingerprint)
    try:
        _files.write_npz_atomic(path, arrays)
        for stale in cache_dir.glob(f"omniglot-{key}-*.npz"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as err:
        warnings.warn(
            f"could not write the Omniglot cache {path} ({err}); the next load decodes again. "
            "Set METAGRAD_CACHE or cache_dir= to a writable folder",
            stacklevel=3,
        )
    return arrays


def _decode(sources: dict[str, Source]) -> dict[str, np.ndarray]:
    """Check each source's structure and decode it; a corrupt zip is moved aside, then reported."""
    layouts = []
    for source in sources.values():
        try:
            layouts.append((source, _source.parse_layout(source, source.members())))
        except CorruptSourceError as err:
            _corrupt(source, err)
    entries = [(s.top, e) for s, es in layouts for e in es]
    if len({(e.alphabet, e.name) for _, e in entries}) != len(entries):
        raise ValueError("an alphabet appears in both halves of Omniglot; use the official data")
    try:
        images = _source.decode_all(layouts, workers=_workers())
    except CorruptSourceError as err:
        _corrupt(next(s for s, _ in layouts if s.path == err.path), err)
    return {
        "images": images,
        "alphabet": np.array([e.alphabet for _, e in entries]),
        "character": np.array([e.name for _, e in entries]),
        "ids": np.array([e.id for _, e in entries], dtype=np.int32),
        "background": np.array([top == TOPS[0] for top, _ in entries]),
        "drawings": np.array(DRAWINGS),
    }


def _corrupt(source: Source, err: Exception) -> NoReturn:
    if source.is_zip:
        where = _files.move_aside(source.path)
        raise CorruptSourceError(
            f"{err}. The zip is corrupt: {where}; it will not be used. Fetch it again "
            f"from {URLS[source.top]}",
            source.path,
        ) from err
    raise CorruptSourceError(
        f"{err}. Replace the bad file from the official zip", source.path
    ) from err


def _workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, 8))
