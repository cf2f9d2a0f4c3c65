"""CIFAR-FS (Bertinetto et al., 2019) and FC100 (Oreshkin et al., 2018): few-shot CIFAR-100.

Both take every one of CIFAR-100's 600 images per class (its 500 training and 100 test images
together) from the official python version, and differ in the class split, shipped with metagrad
as lists of names (``splits/cifar_fs/*.txt``: fine classes; ``splits/fc100/*.txt``:
superclasses). The 60,000 images are decoded once into ``(100, 600, 3, 32, 32)`` uint8 and cached
(``cifar100-<root key>-<fingerprint>.npz``, see :mod:`metagrad.data._images`); CIFAR-100's pickles
are read by the restricted unpickler of :mod:`metagrad.data._pickle`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from metagrad.data import _images, _pickle
from metagrad.data._images import ColourClasses
from metagrad.data.few_shot import ClassSet

__all__ = ["CIFARFS", "FC100", "cifar_fs_splits", "fc100_splits"]

TOP = "cifar-100-python"
SIZE = 32


def _layout(root: Path) -> str:
    return (
        f"expected {TOP}/ holding train, test and meta (CIFAR-100's python version), or "
        f"{TOP}.tar.gz, in {root}"
    )


_Files = tuple[Callable[[str], bytes], list[Path], Callable[[str], str]]
_NAMES = ("train", "test", "meta")


def _locate(root: Path) -> _Files:
    """How to read ``train`` / ``test`` / ``meta``: a reader, the files to fingerprint, names."""
    for folder in (root / TOP, root):
        if all((folder / n).is_file() for n in _NAMES):
            return _in_folder(folder)
    archive = root / f"{TOP}.tar.gz"
    if archive.is_file():
        return (lambda n: _member(archive, n)), [archive], (lambda n: f"{archive}:{TOP}/{n}")
    raise ValueError(f"CIFAR-100 was not found: {_layout(root)} (nothing is downloaded)")


def _in_folder(folder: Path) -> _Files:
    paths = [folder / n for n in _NAMES]
    return (lambda n: (folder / n).read_bytes()), paths, (lambda n: str(folder / n))


def _member(archive: Path, name: str) -> bytes:
    """One file of the official archive, read without extracting anything."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(f"{TOP}/{name}")
            if member is None:
                raise KeyError(name)
            return member.read()
    except KeyError:
        raise ValueError(f"{archive} holds no {TOP}/{name}; {_layout(archive.parent)}") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(
            f"{archive} is not a readable .tar.gz ({err}): it is corrupt; fetch it again"
        ) from err


def _cifar100(root: Path, cache_dir: str | Path | None) -> dict[str, np.ndarray]:
    read, files, where = _locate(root)
    stamp = f"cifar100:{_images.fingerprint(files)}"
    return _images.cached("cifar100", root, stamp, lambda: _decode(read, where, root), cache_dir)


def _decode(
    read: Callable[[str], bytes], where: Callable[[str], str], root: Path
) -> dict[str, np.ndarray]:
    fix = f"{_layout(root)}; fetch the official files again"
    meta = _pickle.load_bytes(read("meta"), where("meta"), fix)
    try:
        fine_names = [_pickle.text(n) for n in _pickle.key(meta, "fine_label_names")]
        coarse_names = [_pickle.text(n) for n in _pickle.key(meta, "coarse_label_names")]
    except (KeyError, TypeError):
        raise ValueError(
            f"{where('meta')} lacks fine_label_names or coarse_label_names; {fix}"
        ) from None
    if len(fine_names) != 100 or len(coarse_names) != 20:
        raise ValueError(
            f"{where('meta')} names {len(fine_names)} classes and {len(coarse_names)} "
            f"superclasses, not CIFAR-100's 100 and 20; {fix}"
        )
    parts = [_batch(read(n), where(n), fix) for n in ("train", "test")]
    data, fine, coarse = (np.concatenate(a) for a in zip(*parts, strict=True))
    if fine.min() < 0 or fine.max() >= 100 or coarse.min() < 0 or coarse.max() >= 20:
        raise ValueError(f"{where('train')}: a label is outside 0..99 (or 0..19); {fix}")
    superclass = np.full(100, -1, dtype=np.int64)
    superclass[fine[::-1]] = coarse[::-1]  # each class's superclass, from its first image
    if (superclass < 0).any() or (superclass[fine] != coarse).any():
        raise ValueError(f"{where('train')}: a class has no images, or two superclasses; {fix}")
    slot, counts = _images.slots(fine, 100)
    out = np.zeros((100, int(counts.max()), 3, SIZE, SIZE), dtype=np.uint8)
    out[fine, slot] = data.reshape(-1, 3, SIZE, SIZE)  # rows are 1024 R, then G, then B values
    return {
        "images": out,
        "counts": counts,
        "names": np.array(fine_names),
        "superclass": np.array([coarse_names[c] for c in superclass]),
    }


def _batch(raw: bytes, where: str, fix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data, fine labels, coarse labels)`` of CIFAR-100's ``train`` or ``test`` pickle."""
    batch = _pickle.load_bytes(raw, where, fix)
    try:
        data = _pickle.key(batch, "data")
        fine = np.asarray(_pickle.key(batch, "fine_labels"), dtype=np.int64).reshape(-1)
        coarse = np.asarray(_pickle.key(batch, "coarse_labels"), dtype=np.int64).reshape(-1)
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{where} lacks data, fine_labels or coarse_labels (integer lists); {fix}"
        ) from None
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not ok or data.shape[1] != 3 * SIZE * SIZE:
        what = getattr(data, "shape", type(data).__name__)
        raise ValueError(f"{where}: data is {what}, not (N, 3072) uint8; {fix}")
    if not len(fine) == len(coarse) == len(data) > 0:
        raise ValueError(
            f"{where}: {len(fine)} fine and {len(coarse)} coarse labels for {len(data)} images; "
            + fix
        )
    return data, fine, coarse


def split_list(protocol: str, split: str) -> list[str]:
    """The shipped list ``splits/<protocol>/<split>.txt``: one name a line."""
    text = resources.files("metagrad.data").joinpath(f"splits/{protocol}/{split}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _subset(full: dict[str, np.ndarray], chosen: list[int]) -> dict[str, np.ndarray]:
    return {k: full[k][chosen] for k in ("images", "counts", "names", "superclass")}


class CIFARFS(ColourClasses):
    """One split of CIFAR-FS: 64 / 16 / 20 CIFAR-100 classes (train / val / test), 600 images each.

    ``root`` holds ``cifar-100-python/`` (``train``, ``test``, ``meta``: the official python
    version; ``root`` may be that folder itself) or the unopened ``cifar-100-python.tar.gz``.
    Classes come in the order of the shipped list (alphabetical), images in file order, training
    images first; ``images`` is ``(classes, 600, 3, 32, 32)`` uint8.

    The class lists are Bertinetto et al.'s (2019) split, as torchmeta ships it
    (``tristandeleu/pytorch-meta``, ``assets/cifar100/cifar-fs/*.json``), against which they were
    checked; they were not checked against the authors' own files (``bertinetto/r2d2``).
    """

    image_shape = (3, SIZE, SIZE)

    def __init__(
        self, root: str | Path, split: str = "train", cache_dir: str | Path | None = None
    ) -> None:
        root = Path(root).expanduser()
        split = _images.split_name(split)
        full = _cifar100(root, cache_dir)
        index = {str(n): i for i, n in enumerate(full["names"].tolist())}
        wanted = split_list("cifar_fs", split)
        unknown = [n for n in wanted if n not in index]
        if unknown:
            raise ValueError(
                f"the CIFAR-FS {split} list names {unknown[:3]}, which {TOP}/meta lacks: "
                "use the official CIFAR-100 (its meta names the 100 classes)"
            )
        chosen = [index[n] for n in wanted]
        super().__init__(_subset(full, chosen), root, split)
        self.superclasses = tuple(str(s) for s in full["superclass"][chosen].tolist())


class FC100(ColourClasses):
    """One split of FC100: 12 / 4 / 4 CIFAR-100 superclasses, so 60 / 20 / 20 classes of 600.

    The superclass split of Oreshkin et al. (2018), chosen so that no superclass spans two
    splits; the lists were checked against torchmeta's copy (``tristandeleu/pytorch-meta``,
    ``assets/cifar100/fc100``), not against the authors' release. Files as for :class:`CIFARFS`;
    classes come in CIFAR-100's label order, ``superclasses[c]`` naming each one's superclass.
    """

    image_shape = (3, SIZE, SIZE)

    def __init__(
        self, root: str | Path, split: str = "train", cache_dir: str | Path | None = None
    ) -> None:
        root = Path(root).expanduser()
        split = _images.split_name(split)
        full = _cifar100(root, cache_dir)
        wanted = set(split_list("fc100", split))
        found = {str(s) for s in full["superclass"].tolist()}
        if not wanted <= found:
            raise ValueError(
                f"the FC100 {split} list names superclasses {sorted(wanted - found)[:3]}, which "
                f"{TOP}/meta lacks: use the official CIFAR-100"
            )
        chosen = [i for i, s in enumerate(full["superclass"].tolist()) if s in wanted]
        super().__init__(_subset(full, chosen), root, split)
        self.superclasses = tuple(str(s) for s in full["superclass"][chosen].tolist())


def cifar_fs_splits(
    *,
    root: str | Path,
    split: str = "bertinetto",
    seed: int = 0,
    rotations: bool | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, ClassSet]:
    """CIFAR-FS's ``train`` / ``val`` / ``test`` classes (``split="bertinetto"``, the only one).

    The lists are fixed (``seed`` is accepted and unused); ``rotations=True`` makes each class
    four (0, 90, 180, 270 degrees), which the published protocol does not.
    """
    return _images.load_splits(CIFARFS, ("bertinetto",), root, split, rotations, cache_dir)


def fc100_splits(
    *,
    root: str | Path,
    split: str = "oreshkin",
    seed: int = 0,
    rotations: bool | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, ClassSet]:
    """FC100's ``train`` / ``val`` / ``test`` classes (``split="oreshkin"``, the only one)."""
    return _images.load_splits(FC100, ("oreshkin",), root, split, rotations, cache_dir)
