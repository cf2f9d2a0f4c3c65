"""Which characters go to train / val / test under each published Omniglot protocol."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Protocol

import torch


class Omniglot(Protocol):
    """What the splits read of :class:`metagrad.data.Omniglot` (a protocol: no import cycle)."""

    root: Path
    alphabets: tuple[str, ...]
    background: tuple[bool, ...]

    def __len__(self) -> int: ...

    def characters(self, alphabet: str) -> list[int]: ...

    def class_names(self, indices: Iterable[int] | None = None) -> list[str]: ...


PROTOCOLS = ("maml", "vinyals", "lake")
DEFAULT_ROTATIONS: dict[str, bool | frozenset[str]] = {
    "maml": frozenset({"train", "trainval"}),
    "vinyals": True,
    "lake": False,
}
MAML_TRAIN, MAML_VAL = 1100, 100


def split_characters(ds: Omniglot, protocol: str, seed: int) -> dict[str, list[str]]:
    """Class names per split (``train``, ``val``, ``test``, ``trainval``) before rotations."""
    if protocol == "maml":
        out = _maml(ds, seed)
    elif protocol == "vinyals":
        out = {name: vinyals_list(ds.root, name) for name in ("train", "val", "test")}
    elif protocol == "lake":
        out = _lake(ds, seed)
    else:
        raise ValueError(f"unknown split protocol {protocol!r}; choose one of {PROTOCOLS}")
    out["trainval"] = out["train"] + out["val"]
    return out


def _maml(ds: Omniglot, seed: int) -> dict[str, list[str]]:
    """Finn et al.: all characters shuffled, 1100 train, 100 val, the rest (423) test."""
    if len(ds) <= MAML_TRAIN + MAML_VAL:
        raise ValueError(
            f"the maml split needs more than {MAML_TRAIN + MAML_VAL} characters (1100 train, 100 "
            f"val, the rest test); this data set has {len(ds)}: load the full Omniglot"
        )
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = {
        "train": perm[:MAML_TRAIN],
        "val": perm[MAML_TRAIN : MAML_TRAIN + MAML_VAL],
        "test": perm[MAML_TRAIN + MAML_VAL :],
    }
    return {name: ds.class_names(sorted(idx)) for name, idx in parts.items()}


def _lake(ds: Omniglot, seed: int) -> dict[str, list[str]]:
    """Background alphabets train (a sixth of them, by ``seed``, for val); evaluation ones test."""
    background = [a for a in ds.alphabets if ds.background[ds.characters(a)[0]]]
    evaluation = [a for a in ds.alphabets if a not in background]
    if len(background) < 2 or not evaluation:
        raise ValueError(
            "the lake split needs at least 2 background and 1 evaluation alphabet; load the full "
            "Omniglot"
        )
    n_val = max(1, len(background) // 6)
    perm = torch.randperm(len(background), generator=torch.Generator().manual_seed(seed))
    val = {background[i] for i in perm[:n_val].tolist()}

    def names(alphabets: list[str]) -> list[str]:
        return ds.class_names(i for a in alphabets for i in ds.characters(a))

    return {
        "train": names([a for a in background if a not in val]),
        "val": names([a for a in background if a in val]),
        "test": names(evaluation),
    }


def vinyals_list(root: Path, name: str) -> list[str]:
    """The published list ``name``: ``root/splits/vinyals/<name>.txt``, else the packaged copy."""
    local = root / "splits" / "vinyals" / f"{name}.txt"
    if local.is_file():
        text = local.read_text()
    else:
        text = resources.files("metagrad.data").joinpath(f"splits/vinyals/{name}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]
