"""Leap's Omniglot protocol (Flennerhag et al., 2019): one many-way task per alphabet."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from metagrad._types import Batch, Task
from metagrad.data.omniglot import Omniglot


def alphabet_tasks(
    ds: Omniglot,
    alphabets: Iterable[str] | None = None,
    classes: int = 20,
    held_out: int = 5,
    seed: int = 0,
) -> dict[str, Task]:
    """One ``classes``-way task per alphabet that has at least ``classes`` characters.

    As in Leap's released code: an alphabet with more characters gives ``classes`` of them drawn
    with ``seed`` (per alphabet, so a character choice does not depend on which other alphabets are
    asked for); label ``j`` is the ``j``-th drawn character. Of each character's 20 drawings the
    first ``held_out`` (drawings 01..05 by default) form the query (held-out) set and the other
    15 the support (training) set. Alphabets with too few characters are skipped; an unknown name
    is an error. No rotation or augmentation is applied (Leap's random affine augmentation belongs
    to the training loop).

    Returns ``{alphabet: Task}`` in the order asked for, each task unbatched:
    ``support.x`` ``(classes * (20 - held_out), 1, 28, 28)`` float32, ``support.y`` int64
    labels grouped by class, the query ``(classes * held_out, ...)``.
    """
    names = list(ds.alphabets if alphabets is None else alphabets)
    drawings = ds.images.shape[1]
    if not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes must be a positive integer, got {classes!r}")
    if not isinstance(held_out, int) or not 1 <= held_out < drawings:
        raise ValueError(
            f"held_out must be in 1..{drawings - 1} (drawings per character), got {held_out!r}"
        )
    tasks = {}
    for alphabet in names:
        members = ds.characters(alphabet)  # raises for an unknown alphabet
        if len(members) < classes:
            continue
        digest = hashlib.sha256(f"{seed}/{alphabet}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))
        pick = torch.randperm(len(members), generator=generator)[:classes]
        chosen = torch.tensor(members)[pick]
        x = ds.images[chosen].unsqueeze(2).to(torch.float32) / 255.0  # (classes, 20, 1, H, W)
        y = torch.arange(classes).view(classes, 1).expand(classes, drawings)
        tasks[alphabet] = Task(
            support=Batch(x[:, held_out:].flatten(0, 1), y[:, held_out:].flatten()),
            query=Batch(x[:, :held_out].flatten(0, 1), y[:, :held_out].flatten()),
        )
    if not tasks:
        raise ValueError(
            f"no alphabet among {names} has at least classes={classes} characters; lower classes"
        )
    return tasks
