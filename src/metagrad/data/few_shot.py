"""N-way K-shot episodes from a set of image classes, vectorised and driven by one generator."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad._types import Batch, Task

_ROT = re.compile(r"(.+)/rot(000|090|180|270)")


def class_name(base: str, quarter_turns: int) -> str:
    """``"Alphabet/characterNN"`` and 1 -> ``"Alphabet/characterNN/rot090"``."""
    return f"{base}/rot{90 * quarter_turns:03d}"


def parse_class_name(name: str) -> tuple[str, int]:
    """``"Alphabet/characterNN/rot090"`` -> ``("Alphabet/characterNN", 1)``; no suffix means 0."""
    match = _ROT.fullmatch(name)
    if match is None:
        return name, 0
    return match[1], int(match[2]) // 90


@dataclass(frozen=True, eq=False)
class ClassSet:
    """The classes of a split: a row of stored images each, under one rotation.

    ``images`` is ``(rows, drawings, H, W)`` (one channel: Omniglot's characters) or ``(rows,
    drawings, C, H, W)``, uint8 (0..255) or floating point, usually the whole data set's storage
    (shared, not copied); class ``c`` is ``images[index[c]]`` turned counter-clockwise by
    ``quarter_turns[c] * 90`` degrees, and is called ``names[c]`` (``"Alphabet/characterNN/rotDDD"``
    for Omniglot). ``counts`` (``(rows,)`` int64, optional) is the number of valid images of each
    row where rows differ in size (tiered-ImageNet's classes): ``images[r, counts[r]:]`` is
    padding, never sampled; ``None`` means every row is full. ``to_json()`` gives the names, from
    which the data set's ``classes(names)`` rebuilds the same set (this is how a run folder
    records its split).
    """

    images: Tensor
    index: Tensor
    quarter_turns: Tensor
    names: tuple[str, ...]
    counts: Tensor | None = None

    def __post_init__(self) -> None:
        if not (
            self.images.dtype == torch.uint8 or self.images.is_floating_point()
        ) or self.images.dim() not in (4, 5):
            raise ValueError(
                f"images must be uint8 or floating point of shape (rows, drawings, H, W) or "
                f"(rows, drawings, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        n = len(self.names)
        if self.index.shape != (n,) or self.quarter_turns.shape != (n,):
            raise ValueError(f"index and quarter_turns must have shape ({n},), one per name")
        if n == 0:
            raise ValueError("a ClassSet needs at least one class")
        if self.counts is not None:
            rows, most = self.images.shape[:2]
            bad = self.counts.shape != (rows,) or bool(
                ((self.counts < 1) | (self.counts > most)).any()
            )
            if bad:
                raise ValueError(
                    f"counts must be None or ({rows},) with values in 1..{most} (the valid images "
                    f"of each row), got shape {tuple(self.counts.shape)}"
                )

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        each = "each" if self.counts is None else "or more each"
        return f"ClassSet({len(self)} classes, {self.drawings} drawings {each})"

    @property
    def drawings(self) -> int:
        """Images of the smallest class (20 for Omniglot, 600 for mini-ImageNet)."""
        if self.counts is None:
            return self.images.shape[1]
        return int(self.counts[self.index.cpu()].min())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image: ``(1, 28, 28)`` Omniglot, ``(3, 84, 84)`` ImageNet."""
        shape = tuple(self.images.shape[2:])
        return (1, *shape) if len(shape) == 2 else shape  # type: ignore[return-value]

    def to_json(self) -> list[str]:
        """The class names, in order: enough to rebuild the set with ``Omniglot.classes``."""
        return list(self.names)

    def with_rotations(self, quarter_turns: Sequence[int]) -> ClassSet:
        """Each distinct character once per quarter turn in ``quarter_turns``, say ``(0, 1, 2, 3)``.

        ``with_rotations((0,))`` drops rotated classes; applying the same turns twice is a no-op.
        """
        if not quarter_turns or any(k not in (0, 1, 2, 3) for k in quarter_turns):
            raise ValueError(
                f"quarter_turns must be a non-empty subset of 0..3, got {quarter_turns}"
            )
        bases: dict[str, int] = {}
        for name, i in zip(self.names, self.index.tolist(), strict=True):
            bases.setdefault(parse_class_name(name)[0], i)
        pairs = [(base, i, k) for base, i in bases.items() for k in sorted(set(quarter_turns))]
        return ClassSet(
            self.images,
            torch.tensor([i for _, i, _ in pairs], dtype=torch.int64, device=self.index.device),
            torch.tensor([k for *_, k in pairs], dtype=torch.int64, device=self.index.device),
            tuple(class_name(base, k) for base, _, k in pairs),
            self.counts,
        )

    def to(self, device: torch.device | str) -> ClassSet:
        """The same classes with their images on ``device``."""
        return ClassSet(
            self.images.to(device),
            self.index.to(device),
            self.quarter_turns.to(device),
            self.names,
            None if self.counts is None else self.counts.to(device),
        )


class FewShotSampler:
    """N-way K-shot episodes: ``sample(n_tasks, generator) -> Task``.

    Each task draws ``ways`` classes without replacement; label ``j`` goes to the ``j``-th drawn
    class, so labels 0..N-1 land on the classes in a random order per task. Each class then gives
    ``shots + queries`` distinct drawings, the first ``shots`` for support and the rest for query:
    support and query are disjoint by construction. Examples are grouped by label
    (``y = [0]*K + [1]*K + ...``). Shapes: ``support.x`` ``(n, ways*shots, C, H, W)`` (C = 1 for
    Omniglot, 3 for the colour data sets), ``support.y`` ``(n, ways*shots)`` int64; the query
    likewise with ``queries``. Stored uint8 images become float32 in [0, 1] (``x / 255``; for
    Omniglot 1 = stroke); floating-point images keep their values and dtype. Where classes differ in
    size (``ClassSet.counts``) the drawings of each class are a uniform draw from its own valid
    images. Randomness comes only from ``generator`` (two ``torch.rand`` draws per call), so a
    generator in the same state gives the same tasks. The sampler holds its classes' images,
    rotated, as one tensor (4400 classes of 20 28x28 drawings: 69 MB; a split that uses every row
    of its storage unrotated, such as an ImageNet split, shares the storage instead of copying it),
    so that a batch of tasks is one gather and one conversion to float.

    ``rotations``: ``None`` keeps the class set as it is (a split already carries its protocol's
    rotations); ``True`` makes every character four classes (0, 90, 180, 270 degrees), ``False``
    keeps only the upright ones.

    Example::

        sampler = FewShotSampler(ds.split("maml")["train"], ways=5, shots=1, queries=15)
        task = sampler.sample(32, torch.Generator().manual_seed(0))
    """

    def __init__(
        self,
        classes: ClassSet,
        ways: int,
        shots: int,
        queries: int,
        rotations: bool | None = None,
    ) -> None:
        if rotations is not None:
            classes = classes.with_rotations((0, 1, 2, 3) if rotations else (0,))
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if ways > len(classes):
            raise ValueError(
                f"ways={ways} exceeds the {len(classes)} classes of this split; use ways <= "
                f"{len(classes)}"
            )
        if shots + queries > classes.drawings:
            raise ValueError(
                f"shots + queries = {shots + queries} exceeds the {classes.drawings} drawings of "
                f"each class; use shots + queries <= {classes.drawings}"
            )
        if classes.images.shape[-1] != classes.images.shape[-2] and bool(
            classes.quarter_turns.any()
        ):
            raise ValueError("rotated classes need square images")
        self.classes = classes
        self.ways, self.shots, self.queries = ways, shots, queries
        self._store = _materialise(classes)
        counts = None if classes.counts is None else classes.counts.cpu()[classes.index.cpu()]
        full = counts is None or bool((counts == self._store.shape[1]).all())
        self._counts = None if full else counts  # valid images per class, where they differ

    def __repr__(self) -> str:
        return (
            f"FewShotSampler({self.classes!r}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries})"
        )

    @property
    def device(self) -> torch.device:
        """Where the images live, and so where the tasks are made."""
        return self.classes.images.device

    def to(self, device: torch.device | str) -> FewShotSampler:
        """The same sampler with its images on ``device`` (the generator may stay on the CPU)."""
        return FewShotSampler(self.classes.to(device), self.ways, self.shots, self.queries)

    def sample(self, n_tasks: int, generator: torch.Generator) -> Task:
        """``n_tasks`` episodes stacked on dim 0, a pure function of ``generator``'s state."""
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
        n, k, q, store = self.ways, self.shots, self.queries, self._store
        gdev = generator.device
        # The top `ways` of uniform keys is a uniformly random ordered draw without replacement.
        picked = torch.rand(n_tasks, len(store), generator=generator, device=gdev).topk(n, dim=1)[1]
        keys = torch.rand(n_tasks, n, store.shape[1], generator=generator, device=gdev)
        if self._counts is not None:  # padding sorts last: the first k + q are valid images
            valid = torch.arange(store.shape[1], device=gdev) < self._counts.to(gdev)[picked, None]
            keys = keys.masked_fill(~valid, 2.0)
        drawings = keys.argsort(dim=2)[..., : k + q].to(self.device)
        rows = picked.to(self.device).unsqueeze(-1)

        def part(columns: Tensor, m: int) -> Batch:
            # One gather into a contiguous block, then (uint8) one division into float32.
            x = store[rows, columns]
            x = x.div(255.0) if x.dtype == torch.uint8 else x
            x = x.view(n_tasks, n * m, *store.shape[-3:])
            y = torch.arange(n, device=self.device).repeat_interleave(m).expand(n_tasks, -1)
            return Batch(x, y.contiguous())

        return Task(part(drawings[..., :k], k), part(drawings[..., k:], q))


def _materialise(classes: ClassSet) -> Tensor:
    """Every class's drawings, rotated, as one ``(classes, drawings, C, H, W)`` tensor.

    The storage itself (no copy) where the classes are its rows in order, unrotated.
    """
    images = classes.images if classes.images.dim() == 5 else classes.images.unsqueeze(2)
    rows = torch.arange(len(images), device=classes.index.device)
    if torch.equal(classes.index, rows) and not bool(classes.quarter_turns.any()):
        return images
    store = images[classes.index]
    for turn in (1, 2, 3):
        mask = classes.quarter_turns == turn
        if bool(mask.any()):
            store[mask] = torch.rot90(store[mask], turn, dims=(-2, -1))
    return store
