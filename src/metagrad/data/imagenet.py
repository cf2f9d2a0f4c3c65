"""Mini-ImageNet (Vinyals et al., 2016; Ravi & Larochelle's split) and tiered-ImageNet (Ren et al.).

Both read the files that users already have (nothing is downloaded) and decode each split once into
``(classes, per class, 3, 84, 84)`` uint8, cached like Omniglot (see :mod:`metagrad.data._images`).
Their pickles are untrusted input, read by a restricted unpickler (:mod:`metagrad.data._pickle`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from metagrad.data import _images, _pickle
from metagrad.data._images import ColourClasses
from metagrad.data.few_shot import ClassSet

__all__ = ["MiniImageNet", "TieredImageNet", "mini_imagenet_splits", "tiered_imagenet_splits"]

SIZE = 84


class MiniImageNet(ColourClasses):
    """One split of mini-ImageNet: 64 / 16 / 20 classes (train / val / test) of 600 images.

    ``root`` holds either layout:

    - ``mini-imagenet-cache-{train,val,test}.pkl``, the widely shared pickles: a dict with
      ``"image_data"`` (``(N, 84, 84, 3)`` uint8) and ``"class_dict"`` (class -> list of row
      indices); read first where both are present;
    - Ravi & Larochelle's ``train.csv`` / ``val.csv`` / ``test.csv`` (a ``filename,label`` header,
      then one ``n0153282900000005.jpg,n01532829`` row per image) with the images in ``images/``,
      resized to 84x84 with Pillow's ``LANCZOS`` (as MAML's ``proc_images.py`` does) where they
      are larger.

    Classes are ordered by name (the WordNet ids), images as the file lists them; ``images`` is
    ``(classes, 600, 3, 84, 84)`` uint8, cached in ``cache_dir`` (default ``$METAGRAD_CACHE``,
    else ``~/.cache/metagrad``) as ``mini-imagenet-<split>-<root key>-<fingerprint>.npz``.

    Example::

        train = MiniImageNet("~/data/mini-imagenet", "train")
        sampler = FewShotSampler(train.classes(), ways=5, shots=1, queries=15)
    """

    image_shape = (3, SIZE, SIZE)

    def __init__(
        self, root: str | Path, split: str = "train", cache_dir: str | Path | None = None
    ) -> None:
        root = Path(root).expanduser()
        split = _images.split_name(split)
        pkl, table = root / f"mini-imagenet-cache-{split}.pkl", root / f"{split}.csv"
        layout = (
            f"expected mini-imagenet-cache-{split}.pkl, or {split}.csv (a filename,label header, "
            f"then one row per image) with the images in images/, in {root}"
        )
        if pkl.is_file():
            stamp = f"pkl:{SIZE}:{_images.fingerprint([pkl])}"
            arrays = _images.cached(
                f"mini-imagenet-{split}", root, stamp, lambda: _from_pickle(pkl), cache_dir
            )
        elif table.is_file():
            files, labels = _read_csv(table, layout)
            paths = [root / "images" / f for f in files]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise ValueError(
                    f"{len(missing)} images of {table.name} are missing, e.g. {missing[0]}; "
                    f"{layout} (nothing is downloaded)"
                )
            stamp = f"csv:{SIZE}:lanczos:{_images.fingerprint([table, *paths])}"
            arrays = _images.cached(
                f"mini-imagenet-{split}",
                root,
                stamp,
                lambda: _from_folder(paths, labels, f"mini-ImageNet {split}"),
                cache_dir,
            )
        else:
            raise ValueError(f"mini-ImageNet's {split} split was not found: {layout}")
        super().__init__(arrays, root, split)


def _read_csv(table: Path, layout: str) -> tuple[list[str], list[str]]:
    """The ``(filename, label)`` rows of a Ravi & Larochelle split file."""
    try:
        with open(table, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{table} cannot be read ({err}); {layout}") from err
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{table} does not start with the header filename,label; {layout}")
    body = [r for r in rows[1:] if r]
    bad = next((r for r in body if len(r) != 2 or not r[0].strip() or not r[1].strip()), None)
    if bad is not None or not body:
        what = f"the row {','.join(bad)!r}" if bad is not None else "no rows"
        raise ValueError(f"{table} has {what}; {layout}")
    return [r[0].strip() for r in body], [r[1].strip() for r in body]


def _from_folder(paths: list[Path], labels: list[str], desc: str) -> dict[str, np.ndarray]:
    names = sorted(set(labels))
    ids = _codes(labels, names)
    slot, counts = _images.slots(ids, len(names))
    out = np.zeros((len(names), int(counts.max()), 3, SIZE, SIZE), dtype=np.uint8)
    _images.decode_into(
        out, (ids, slot), [str(p) for p in paths], lambda i: str(paths[i]), desc, _images.workers()
    )
    return {"images": out, "counts": counts, "names": np.array(names)}


def _codes(labels: list[str], names: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[x] for x in labels], dtype=np.int64)


MINI_PICKLE = (
    'a dict with "image_data" ((N, 84, 84, 3) uint8) and "class_dict" (class -> list of row '
    "indices)"
)


def _from_pickle(pkl: Path) -> dict[str, np.ndarray]:
    fix = f"expected {MINI_PICKLE}; fetch the file again"
    data = _pickle.load(pkl, fix)
    try:
        images, classes = _pickle.key(data, "image_data"), _pickle.key(data, "class_dict")
    except (KeyError, TypeError):
        raise ValueError(f"{pkl} lacks image_data or class_dict; {fix}") from None
    array = isinstance(images, np.ndarray) and images.dtype == np.uint8
    if not array or images.shape[1:] != (SIZE, SIZE, 3):
        what = getattr(images, "shape", type(images).__name__)
        raise ValueError(f"{pkl}: image_data is {what}, not (N, 84, 84, 3) uint8; {fix}")
    if not isinstance(classes, dict) or not classes:
        raise ValueError(f"{pkl}: class_dict is not a non-empty dict; {fix}")
    rows = {_pickle.text(k): v for k, v in classes.items()}
    names = sorted(rows)
    try:
        index = [np.asarray(rows[n], dtype=np.int64).reshape(-1) for n in names]
    except (TypeError, ValueError):
        raise ValueError(
            f"{pkl}: class_dict's values are not lists of row indices; {fix}"
        ) from None
    if any(len(i) == 0 or i.min() < 0 or i.max() >= len(images) for i in index):
        raise ValueError(f"{pkl}: class_dict names rows outside image_data's {len(images)}; {fix}")
    counts = np.array([len(i) for i in index])
    out = np.zeros((len(names), int(counts.max()), 3, SIZE, SIZE), dtype=np.uint8)
    for c, i in enumerate(index):
        out[c, : len(i)] = images[i].transpose(0, 3, 1, 2)
    return {"images": out, "counts": counts, "names": np.array(names)}


class TieredImageNet(ColourClasses):
    """One split of tiered-ImageNet (Ren et al., 2018): 351 / 97 / 160 classes, 84x84.

    ``root`` holds ``{split}_labels.pkl`` (a dict with ``"label_specific"`` and
    ``"label_general"``, one class and one superclass index per image, and
    ``"label_specific_str"`` / ``"label_general_str"``, their names) and the images as either
    ``{split}_images_png.pkl`` (a list of PNG-encoded uint8 arrays, Ren et al.'s release) or
    ``{split}_images.npz`` (an array ``"images"``, ``(N, 84, 84, 3)`` uint8; read first where
    both are present). Classes are in label order and differ in size (732 to 1300 images in the
    full data set): ``images`` is padded to the largest, ``counts`` says how many are real, and
    the sampler draws from those only. ``superclasses[c]`` is class ``c``'s superclass name.
    Decoding the PNGs takes minutes on the full data set (worker processes); the result is
    cached like :class:`MiniImageNet`'s (``tiered-imagenet-<split>-...``).
    """

    image_shape = (3, SIZE, SIZE)

    def __init__(
        self, root: str | Path, split: str = "train", cache_dir: str | Path | None = None
    ) -> None:
        root = Path(root).expanduser()
        split = _images.split_name(split)
        labels = root / f"{split}_labels.pkl"
        png, npz = root / f"{split}_images_png.pkl", root / f"{split}_images.npz"
        layout = (
            f"expected {split}_labels.pkl with {split}_images_png.pkl or {split}_images.npz, "
            f"in {root}"
        )
        images = npz if npz.is_file() else png
        if not labels.is_file() or not images.is_file():
            raise ValueError(f"tiered-ImageNet's {split} split was not found: {layout}")
        stamp = f"{images.suffix}:{SIZE}:{_images.fingerprint([labels, images])}"
        arrays = _images.cached(
            f"tiered-imagenet-{split}",
            root,
            stamp,
            lambda: _tiered(labels, images, layout),
            cache_dir,
        )
        super().__init__(arrays, root, split)
        self.superclasses: tuple[str, ...] = tuple(str(s) for s in arrays["superclass"].tolist())


def _tiered(labels_pkl: Path, images_path: Path, layout: str) -> dict[str, np.ndarray]:
    specific, names, superclass = _tiered_labels(labels_pkl, layout)
    slot, counts = _images.slots(specific, len(names))
    out = np.zeros((len(names), int(counts.max()), 3, SIZE, SIZE), dtype=np.uint8)
    if images_path.suffix == ".npz":
        start = 0
        fix = f"expected an array 'images', (N, 84, 84, 3) uint8 for N labels; {layout}"
        shape = (len(specific), SIZE, SIZE, 3)
        for chunk in _images.npz_rows(images_path, "images", shape, fix):
            end = start + len(chunk)
            out[specific[start:end], slot[start:end]] = chunk.transpose(0, 3, 1, 2)
            start = end
    else:
        blobs = _png_list(images_path, len(specific), layout)
        _images.decode_into(
            out,
            (specific, slot),
            blobs,
            lambda i: f"image {i} of {images_path}",
            f"decoding {images_path.name}",
            _images.workers(),
        )
    return {"images": out, "counts": counts, "names": np.array(names), "superclass": superclass}


def _tiered_labels(path: Path, layout: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Each image's class, the class names, and each class's superclass name."""
    fix = f"{layout}; fetch the file again"
    data = _pickle.load(path, fix)
    try:
        fields = [
            _pickle.key(data, k)
            for k in ("label_specific", "label_general", "label_specific_str", "label_general_str")
        ]
    except (KeyError, TypeError):
        raise ValueError(
            f"{path} lacks label_specific, label_general, label_specific_str or "
            f"label_general_str; {fix}"
        ) from None
    try:
        specific, general = (np.asarray(f, dtype=np.int64).reshape(-1) for f in fields[:2])
        names, general_names = ([_pickle.text(s) for s in f] for f in fields[2:])
    except (TypeError, ValueError):
        raise ValueError(
            f"{path}: the labels are not integer arrays and name lists; {fix}"
        ) from None
    if len(specific) == 0 or len(specific) != len(general):
        raise ValueError(f"{path}: label_specific and label_general differ in length; {fix}")
    in_range = specific.min() >= 0 and specific.max() < len(names)
    if not in_range or general.min() < 0 or general.max() >= len(general_names):
        raise ValueError(f"{path}: a label exceeds its list of names; {fix}")
    first = np.full(len(names), -1, dtype=np.int64)
    first[specific[::-1]] = general[::-1]  # each class's superclass, from its first image
    if (first < 0).any() or (first[specific] != general).any():
        raise ValueError(f"{path}: a class has no images, or two superclasses; {fix}")
    return specific, names, np.array([general_names[g] for g in first])


def _png_list(path: Path, n: int, layout: str) -> list[bytes | np.ndarray]:
    fix = f"expected a list of PNG-encoded uint8 arrays, one per label; {layout}"
    data = _pickle.load(path, f"{fix}; fetch the file again")
    if not isinstance(data, (list, tuple, np.ndarray)) or len(data) != n:
        size = len(data) if hasattr(data, "__len__") else type(data).__name__
        raise ValueError(f"{path} holds {size} items for {n} labels; {fix}")
    if not all(isinstance(b, (bytes, np.ndarray)) for b in data):
        raise ValueError(f"{path} holds items that are not encoded images; {fix}")
    return list(data)  # bytes or uint8 arrays, both buffers that Pillow reads (not copied here)


def mini_imagenet_splits(
    *,
    root: str | Path,
    split: str = "ravi",
    seed: int = 0,
    rotations: bool | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, ClassSet]:
    """Mini-ImageNet's ``train`` / ``val`` / ``test`` classes (``split="ravi"``, the only one).

    The split is fixed by the files (``seed`` is accepted and unused); ``rotations=True`` makes
    each class four (0, 90, 180, 270 degrees), which no published protocol does.
    """
    return _images.load_splits(MiniImageNet, ("ravi",), root, split, rotations, cache_dir)


def tiered_imagenet_splits(
    *,
    root: str | Path,
    split: str = "ren",
    seed: int = 0,
    rotations: bool | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, ClassSet]:
    """Tiered-ImageNet's ``train`` / ``val`` / ``test`` classes (``split="ren"``, the only one)."""
    return _images.load_splits(TieredImageNet, ("ren",), root, split, rotations, cache_dir)
