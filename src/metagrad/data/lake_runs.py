"""Lake et al.'s (2015) one-shot classification runs: 20 within-alphabet 20-way one-shot problems.

The official ``all_runs.zip`` (Omniglot repository, ``python/one-shot-classification``) holds
``run01`` .. ``run20``, each with ``training/class01.png`` .. ``class20.png`` (one drawing of each
of 20 characters of one alphabet), ``test/item01.png`` .. ``item20.png`` (another drawer's drawing
of each), and ``class_labels.txt`` pairing them, one line per test item:
``run01/test/item01.png run01/training/class08.png``. :class:`LakeRuns` reads that format from the
zip or its unzipped folder; :func:`make_lake_runs` writes runs in the same format from the
evaluation alphabets of an :class:`~metagrad.data.Omniglot`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metagrad._types import Batch, Task
from metagrad.data import _files
from metagrad.data._source import decode_png
from metagrad.data.omniglot import Omniglot

_LABELS = re.compile(r"(?:(.*)/)?(run\d+)/class_labels\.txt")
_RUN_FILE = re.compile(r"(?:(.*)/)?(run\d+)/(?:training|test|class_labels\.txt)(?:/.*)?")
_HOW = (
    "use the official all_runs.zip (Omniglot repository, python/one-shot-classification) or its "
    "unzipped folder, or build runs with metagrad.data.make_lake_runs(ds, path)"
)


class LakeRuns:
    """The one-shot runs found at ``path`` (``all_runs.zip`` or a folder holding ``runNN/``).

    Run ``r`` is a :class:`~metagrad.Task`: the support set is the run's training images
    ``class01 .. classNN`` with labels ``0 .. NN-1`` in that order, the query set its test items
    ``item01 .. itemNN`` in that order, each labelled with the class that ``class_labels.txt``
    pairs it with. Images are decoded like Omniglot's (28x28, ``BOX``, 1 = stroke), shape
    ``(NN, 1, 28, 28)`` float32; labels int64. ``runs.task()`` stacks every run on dim 0.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        files = _read_tree(self.path)
        found = sorted((m[2], m[1] or "") for key in files if (m := _LABELS.fullmatch(key)))
        if not found:
            raise ValueError(f"{self.path} holds no runNN/class_labels.txt; {_HOW}")
        runs = {(m[2], m[1] or "") for key in files if (m := _RUN_FILE.fullmatch(key))}
        unlabelled = sorted(runs - set(found))
        if unlabelled:  # a run left out would change the error rate, silently
            run, prefix = unlabelled[0]
            raise ValueError(
                f"{self.path}: {f'{prefix}/{run}'.lstrip('/')}/class_labels.txt is missing (it "
                f"pairs each test item with its class); restore it, or {_HOW}"
            )
        self.names: tuple[str, ...] = tuple(run for run, _ in found)
        self._tasks = [_parse_run(files, f"{prefix}/{run}".lstrip("/")) for run, prefix in found]

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> Task:
        return self._tasks[i]

    def __repr__(self) -> str:
        return f"LakeRuns({len(self)} runs from {self.path})"

    def task(self) -> Task:
        """Every run stacked on dim 0 (the runs must all have the same number of classes)."""
        tasks = self._tasks
        return Task(
            Batch(
                torch.stack([t.support.x for t in tasks]), torch.stack([t.support.y for t in tasks])
            ),
            Batch(torch.stack([t.query.x for t in tasks]), torch.stack([t.query.y for t in tasks])),
        )


def _read_tree(path: Path) -> dict[str, bytes]:
    """Every file under a folder or in a zip, by its ``/``-separated relative path."""
    if path.is_dir():
        return {
            p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()
        }
    if not path.is_file():
        raise FileNotFoundError(
            f"no one-shot runs at {path.resolve()}: expected all_runs.zip or a folder holding "
            f"run01/ .. run20/ (training/classNN.png, test/itemNN.png, class_labels.txt); {_HOW}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            return {
                _files.check_member(info.filename).as_posix(): archive.read(info)
                for info in archive.infolist()
                if not info.is_dir()
            }
    except zipfile.BadZipFile as err:  # the user's file: reported, never moved
        raise ValueError(f"{path} is a corrupt zip ({err}) and was not used; {_HOW}") from err


def _parse_run(files: dict[str, bytes], run: str) -> Task:
    """One run's task; ``ValueError`` naming the file when the run is incomplete or inconsistent."""
    training = sorted(k for k in files if k.startswith(f"{run}/training/") and k.endswith(".png"))
    test = sorted(k for k in files if k.startswith(f"{run}/test/") and k.endswith(".png"))
    labels_file = f"{run}/class_labels.txt"
    pairs = {}
    for n, line in enumerate(files[labels_file].decode().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{labels_file}:{n}: expected 'test/itemNN.png training/classNN.png'")
        item, cls = (f"{run}/" + "/".join(p.replace("\\", "/").split("/")[-2:]) for p in parts)
        if item not in test or cls not in training:
            raise ValueError(f"{labels_file}:{n}: {line.strip()!r} names a missing image; {_HOW}")
        pairs[item] = training.index(cls)
    if not training or sorted(pairs) != test:
        raise ValueError(
            f"{run}: {len(training)} training images, {len(test)} test items and {len(pairs)} "
            f"labelled items: every test item needs one line in class_labels.txt; {_HOW}"
        )

    def images(keys: list[str]) -> Tensor:
        array = np.stack([decode_png(files[k]) for k in keys])
        return torch.from_numpy(array).unsqueeze(1).to(torch.float32) / 255.0

    return Task(
        Batch(images(training), torch.arange(len(training))),
        Batch(images(test), torch.tensor([pairs[k] for k in test], dtype=torch.int64)),
    )


def make_lake_runs(
    ds: Omniglot,
    out_path: str | Path,
    seed: int = 0,
    *,
    alphabets: int = 10,
    runs_per_alphabet: int = 2,
    ways: int = 20,
) -> Path:
    """Write one-shot runs in the official format, from ``ds``'s evaluation alphabets.

    As in Lake et al.: ``alphabets`` evaluation alphabets (drawn with ``seed``),
    ``runs_per_alphabet`` runs each (20 in all by default); a run takes ``ways`` characters of its
    alphabet and two distinct drawers, one for every training image and the other for every test
    item; the test items come in a random order. The original PNGs are copied, so
    :class:`LakeRuns` reads back exactly ``ds``'s images. ``out_path`` ending in ``.zip`` gives a
    zip, else a folder; either is written atomically and never replaces an existing file
    (``FileExistsError``).
    """
    out = Path(out_path).expanduser()
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another out_path")
    evaluation = [a for a in ds.alphabets if not ds.background[ds.characters(a)[0]]]
    usable = [a for a in evaluation if len(ds.characters(a)) >= ways]
    if min(alphabets, runs_per_alphabet, ways) < 1 or len(usable) < alphabets:
        raise ValueError(
            f"need alphabets >= 1 evaluation alphabets with ways >= 1 characters each and "
            f"runs_per_alphabet >= 1; got alphabets={alphabets}, ways={ways}, "
            f"runs_per_alphabet={runs_per_alphabet}, and {len(usable)} alphabets qualify"
        )
    g = torch.Generator().manual_seed(seed)
    wanted, lines = [], {}
    chosen = [usable[i] for i in torch.randperm(len(usable), generator=g)[:alphabets].tolist()]
    for r, alphabet in enumerate(a for a in chosen for _ in range(runs_per_alphabet)):
        run = f"run{r + 1:02d}"
        members = ds.characters(alphabet)
        chars = [members[i] for i in torch.randperm(len(members), generator=g)[:ways].tolist()]
        train_drawer, test_drawer = torch.randperm(ds.images.shape[1], generator=g)[:2].tolist()
        order = torch.randperm(ways, generator=g).tolist()
        for j, c in enumerate(chars):
            wanted.append((f"{run}/training/class{j + 1:02d}.png", c, train_drawer))
        for i, j in enumerate(order):
            wanted.append((f"{run}/test/item{i + 1:02d}.png", chars[j], test_drawer))
        lines[run] = "".join(
            f"{run}/test/item{i + 1:02d}.png {run}/training/class{j + 1:02d}.png\n"
            for i, j in enumerate(order)
        )
    data = ds.read_pngs([(c, d) for _, c, d in wanted])
    files = {name: png for (name, _, _), png in zip(wanted, data, strict=True)}
    files.update({f"{run}/class_labels.txt": text.encode() for run, text in lines.items()})
    _write_tree(out, files)
    return out


def _write_tree(out: Path, files: dict[str, bytes]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if out.suffix == ".zip":
            with zipfile.ZipFile(tmp / out.name, "w", zipfile.ZIP_DEFLATED) as archive:
                for name in sorted(files):
                    archive.writestr(name, files[name])
            os.replace(tmp / out.name, out)
        else:
            for name, data in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
