"""Small colour data sets written exactly as the real files are, for the ImageNet and CIFAR tests.

- mini-ImageNet: ``mini-imagenet-cache-{split}.pkl`` (a Python 3 pickle: ``image_data``
  ``(N, 84, 84, 3)`` uint8, ``class_dict`` name -> row indices), or Ravi & Larochelle's
  ``{split}.csv`` (``filename,label``) with JPEGs of other sizes in ``images/``.
- tiered-ImageNet: ``{split}_labels.pkl`` and ``{split}_images_png.pkl`` (Python 2 pickles, as Ren
  et al. released them) or ``{split}_images.npz``.
- CIFAR-100's python version: ``cifar-100-python/{train,test,meta}``, Python 2 pickles with
  CIFAR-100's real class and superclass names, or the ``.tar.gz`` holding them.

Where a format allows it, images carry a code: pixel (0, 0) holds the class (red), the image's
index within its class (green) and 255 (blue), so that a test can tell which image a sampler drew
and that it never drew padding (zeros).
"""

from __future__ import annotations

import csv
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")

# CIFAR-100's superclasses (coarse labels 0..19) and their five classes each; the fine labels are
# the 100 class names in alphabetical order, as meta's fine_label_names lists them.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_COARSE = tuple(CIFAR100_SUPERCLASSES)
CIFAR100_FINE = tuple(sorted(c for group in CIFAR100_SUPERCLASSES.values() for c in group))
FINE_TO_COARSE = {c: s for s, group in CIFAR100_SUPERCLASSES.items() for c in group}


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol 2 written as Python 2's cPickle did: every string a byte string, NumPy 1 names."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_string(self, obj: str | bytes, data: bytes) -> None:
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + data)
        self.memoize(obj)  # the object itself, so that its id stays taken while it is memoized

    def save_bytes(self, obj: bytes) -> None:
        self._save_string(obj, obj)

    def save_str(self, obj: str) -> None:
        self._save_string(obj, obj.encode("latin1"))

    def save_global(self, obj, name=None) -> None:  # type: ignore[no-untyped-def]
        module = getattr(obj, "__module__", None) or "__main__"
        module = module.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__name__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def py2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2 would have (what CIFAR-100 and tiered-ImageNet ship)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def coded_image(rng: np.random.Generator, size: int, label: int, index: int) -> np.ndarray:
    """A random ``(size, size, 3)`` uint8 image whose pixel (0, 0) is ``(label, index, 255)``."""
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image[0, 0] = (label, index, 255)
    return image


def decode_codes(x) -> tuple:  # type: ignore[no-untyped-def]
    """``(label, index, marker)`` codes of float images ``(..., 3, H, W)`` in [0, 1]."""
    codes = (x[..., :, 0, 0] * 255).round().long()
    return codes[..., 0], codes[..., 1], codes[..., 2]


# mini-ImageNet ------------------------------------------------------------------------------------

MINI_CLASSES = {"train": 5, "val": 3, "test": 4}


def wnid(split: str, c: int) -> str:
    return f"n{SPLITS.index(split) + 1:02d}{c:06d}"


def make_mini_pickles(root: Path, per_class: int = 12, seed: int = 0) -> dict[str, dict]:
    """``mini-imagenet-cache-{split}.pkl`` for every split; returns what each holds.

    Rows are shuffled, so that ``class_dict`` lists scattered indices.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in MINI_CLASSES.items():
        images = np.stack([coded_image(rng, 84, c, i) for c in range(n) for i in range(per_class)])
        labels = np.repeat(np.arange(n), per_class)
        perm = rng.permutation(len(images))
        images, labels = images[perm], labels[perm]
        class_dict = {wnid(split, c): np.flatnonzero(labels == c).tolist() for c in range(n)}
        data = {"image_data": images, "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(data, protocol=4))
        out[split] = data
    return out


def make_mini_folder(root: Path, per_class: int = 8, seed: int = 0) -> dict[str, list]:
    """Ravi & Larochelle's layout: ``{split}.csv`` and JPEGs of assorted sizes in ``images/``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows_of = {}
    for split, n in MINI_CLASSES.items():
        rows = []
        for c in range(n):
            label = wnid(split, c)
            for i in range(per_class):
                name = f"{label}{i + 1:08d}.jpg"
                h, w = rng.integers(60, 120, size=2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / name, quality=90)
                rows.append((name, label))
        order = rng.permutation(len(rows))
        rows = [rows[i] for i in order]
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
        rows_of[split] = rows
    return rows_of


# tiered-ImageNet ----------------------------------------------------------------------------------

TIERED_SIZES = {"train": (7, 9, 6, 8), "val": (6, 7), "test": (8, 6, 6)}
"""Images per class: unequal, as tiered-ImageNet's are."""


def make_tiered(root: Path, variant: str = "png", seed: int = 0) -> dict[str, dict]:
    """``{split}_labels.pkl`` with ``{split}_images_png.pkl`` (``variant="png"``) or
    ``{split}_images.npz`` (``"npz"``), images interleaved across classes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, sizes in TIERED_SIZES.items():
        items = [(c, i) for c, n in enumerate(sizes) for i in range(n)]
        items = [items[k] for k in rng.permutation(len(items))]
        images = np.stack([coded_image(rng, 84, c, i) for c, i in items])
        specific = np.array([c for c, _ in items], dtype=np.int64)
        general = specific // 2  # two classes per superclass
        labels = {
            "label_specific": specific,
            "label_general": general,
            "label_specific_str": [f"{split}-class-{c}" for c in range(len(sizes))],
            "label_general_str": [f"{split}-super-{g}" for g in range(int(general.max()) + 1)],
        }
        (root / f"{split}_labels.pkl").write_bytes(py2_pickle(labels))
        if variant == "png":
            blobs = [np.frombuffer(png_bytes(im), dtype=np.uint8) for im in images]
            (root / f"{split}_images_png.pkl").write_bytes(py2_pickle(blobs))
        else:
            np.savez(root / f"{split}_images.npz", images=images)
        out[split] = {"images": images, **labels}
    return out


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# CIFAR-100 ----------------------------------------------------------------------------------------


def make_cifar100(
    root: Path, train: int = 8, test: int = 2, layout: str = "folder", python2: bool = True
) -> dict[str, np.ndarray]:
    """CIFAR-100's python version with ``train`` + ``test`` images per class, interleaved.

    ``layout``: ``"folder"`` (``root/cifar-100-python/``) or ``"tar"`` (``.tar.gz``).
    ``python2=False`` writes Python 3 pickles with ``bytes`` keys instead. Returns every image
    ``(100, train + test, 3, 32, 32)`` in file order (training images first).
    """
    rng = np.random.default_rng(0)
    fine_ids = {name: i for i, name in enumerate(CIFAR100_FINE)}
    per_class = np.zeros((100, train + test, 3, 32, 32), dtype=np.uint8)
    files = {}
    for part, n, offset in (("train", train, 0), ("test", test, train)):
        items = [(c, offset + i) for c in range(100) for i in range(n)]
        items = [items[k] for k in rng.permutation(len(items))]
        rows, seen = [], [offset] * 100
        for c, i in items:
            image = coded_image(rng, 32, c, i).transpose(2, 0, 1)
            per_class[c, seen[c]] = image  # in file order
            seen[c] += 1
            rows.append(image.reshape(-1))
        coarse = [CIFAR100_COARSE.index(FINE_TO_COARSE[CIFAR100_FINE[c]]) for c, _ in items]
        batch = {
            "filenames": [f"image_{c}_{i}.png" for c, i in items],
            "batch_label": f"{part}ing batch 1 of 1",
            "fine_labels": [c for c, _ in items],
            "coarse_labels": coarse,
            "data": np.stack(rows),
        }
        files[part] = batch
    files["meta"] = {
        "fine_label_names": list(CIFAR100_FINE),
        "coarse_label_names": list(CIFAR100_COARSE),
    }
    assert sorted(fine_ids) == list(CIFAR100_FINE)
    blobs = {name: _cifar_pickle(obj, python2) for name, obj in files.items()}
    write_cifar(root, blobs, layout)
    return per_class


def _cifar_pickle(obj: dict, python2: bool) -> bytes:
    if python2:
        return py2_pickle(obj)
    return pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=4)


def write_cifar(root: Path, blobs: dict[str, bytes], layout: str = "folder") -> None:
    """Write the three files (name -> bytes) as a folder or as the official ``.tar.gz``."""
    root.mkdir(parents=True, exist_ok=True)
    if layout == "folder":
        (root / "cifar-100-python").mkdir(exist_ok=True)
        for name, blob in blobs.items():
            (root / "cifar-100-python" / name).write_bytes(blob)
        return
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


class Evil:
    """Pickles to a call of ``os.system`` that would create ``marker``: never to be run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))
