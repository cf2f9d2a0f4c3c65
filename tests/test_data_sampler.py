"""FewShotSampler and ClassSet on synthetic classes whose pixels encode (class, drawing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import metagrad as mg
from metagrad.data import ClassSet, FewShotSampler


def coded_classes(n_classes: int = 12, drawings: int = 20, size: int = 6) -> ClassSet:
    """Pixel (0, 0) holds the class + 1 and pixel (0, 1) the drawing + 1; the rest is noise."""
    g = torch.Generator().manual_seed(123)
    shape = (n_classes, drawings, size, size)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    images[:, :, 0, 0] = torch.arange(1, n_classes + 1, dtype=torch.uint8).view(-1, 1)
    images[:, :, 0, 1] = torch.arange(1, drawings + 1, dtype=torch.uint8).view(1, -1)
    names = tuple(f"A/character{c + 1:02d}/rot000" for c in range(n_classes))
    zeros = torch.zeros(n_classes, dtype=torch.int64)
    return ClassSet(images, torch.arange(n_classes), zeros, names)


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, drawing) of each image of ``x`` (..., 1, H, W)."""
    codes = (x[..., 0, 0, :2] * 255).round().long() - 1
    return codes[..., 0], codes[..., 1]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("ways", "shots", "queries"), [(5, 1, 15), (12, 5, 15), (3, 2, 1)])
def test_shapes_dtypes_and_labels(ways: int, shots: int, queries: int) -> None:
    task = FewShotSampler(coded_classes(), ways, shots, queries).sample(7, gen(0))
    assert isinstance(task, mg.Task) and isinstance(task.support, mg.Batch)
    assert task.support.x.shape == (7, ways * shots, 1, 6, 6)
    assert task.query.x.shape == (7, ways * queries, 1, 6, 6)
    assert task.support.x.dtype == torch.float32 and task.support.y.dtype == torch.int64
    assert 0.0 <= float(task.support.x.min()) and float(task.query.x.max()) <= 1.0
    expected = torch.arange(ways).repeat_interleave(shots)
    assert torch.equal(task.support.y, expected.expand(7, -1))
    counts = torch.stack([torch.bincount(y, minlength=ways) for y in task.query.y])
    assert torch.all(counts == queries)  # label balance


def test_classes_distinct_and_consistent_and_drawings_disjoint() -> None:
    ways, shots, queries = 6, 3, 4
    task = FewShotSampler(coded_classes(), ways, shots, queries).sample(50, gen(1))
    s_cls, s_draw = decode(task.support.x)
    q_cls, q_draw = decode(task.query.x)
    s_cls, s_draw = s_cls.view(50, ways, shots), s_draw.view(50, ways, shots)
    q_cls, q_draw = q_cls.view(50, ways, queries), q_draw.view(50, ways, queries)
    for t in range(50):
        # one class per label, the same in support and query, all labels different classes
        assert torch.all(s_cls[t] == s_cls[t, :, :1]) and torch.all(q_cls[t] == s_cls[t, :, :1])
        assert len(set(s_cls[t, :, 0].tolist())) == ways
        for j in range(ways):
            drawn = s_draw[t, j].tolist() + q_draw[t, j].tolist()
            assert len(set(drawn)) == shots + queries  # distinct: support and query disjoint


def test_label_order_is_random_and_every_class_is_drawn() -> None:
    task = FewShotSampler(coded_classes(), 5, 1, 1).sample(400, gen(2))
    first = decode(task.support.x)[0][:, 0]
    assert len(set(first.tolist())) == 12  # label 0 lands on every class
    counts = torch.bincount(decode(task.support.x)[0].flatten(), minlength=12).float()
    assert counts.min() > 0.6 * counts.mean()  # roughly uniform over classes


def test_determinism_and_only_the_given_generator() -> None:
    sampler = FewShotSampler(coded_classes(), 5, 2, 3, rotations=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = sampler.sample(8, gen(7))
    assert torch.equal(torch.get_rng_state(), state)  # global random state untouched
    torch.manual_seed(99)
    b = sampler.sample(8, gen(7))
    c = sampler.sample(8, gen(8))
    for u, v in zip(a.support + a.query, b.support + b.query, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a.support.x, c.support.x)
    g = gen(7)
    first, second = sampler.sample(8, g), sampler.sample(8, g)
    assert torch.equal(first.query.x, a.query.x) and not torch.equal(second.query.x, a.query.x)


def test_rotations_match_pillow() -> None:
    base = coded_classes(n_classes=1)
    for k, transpose in [
        (1, Image.Transpose.ROTATE_90),
        (2, Image.Transpose.ROTATE_180),
        (3, Image.Transpose.ROTATE_270),
    ]:
        classes = base.with_rotations((k,))
        assert classes.names == (f"A/character01/rot{90 * k:03d}",)
        task = FewShotSampler(classes, 1, 1, 19).sample(1, gen(k))
        images = torch.cat([task.support.x[0], task.query.x[0]])[:, 0]
        got = {tuple((img * 255).round().to(torch.uint8).flatten().tolist()) for img in images}
        want = {
            tuple(np.asarray(Image.fromarray(d.numpy()).transpose(transpose)).flatten().tolist())
            for d in base.images[0]
        }
        assert got == want  # counter-clockwise, as Pillow's rotate(90 * k)


def test_with_rotations_and_sampler_override() -> None:
    classes = coded_classes()
    four = classes.with_rotations((0, 1, 2, 3))
    assert len(four) == 48 and four.names[:2] == ("A/character01/rot000", "A/character01/rot090")
    assert four.with_rotations((0, 1, 2, 3)).names == four.names  # idempotent
    assert four.with_rotations((0,)).names == classes.names
    assert len(FewShotSampler(classes, 5, 1, 1, rotations=True).classes) == 48
    assert len(FewShotSampler(four, 5, 1, 1, rotations=False).classes) == 12
    assert len(FewShotSampler(four, 5, 1, 1).classes) == 48
    assert four.to_json() == list(four.names)
    with pytest.raises(ValueError, match="subset of 0..3"):
        classes.with_rotations((4,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ways": 13}, "exceeds the 12 classes"),
        ({"shots": 10, "queries": 11}, "exceeds the 20 drawings"),
        ({"ways": 0}, "ways must be a positive integer"),
        ({"shots": -1}, "shots must be a positive integer"),
        ({"queries": 0}, "queries must be a positive integer"),
        ({"ways": 2.0}, "ways must be a positive integer"),
    ],
)
def test_bad_sampler_arguments(kwargs: dict, message: str) -> None:
    args = {"ways": 5, "shots": 1, "queries": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        FewShotSampler(coded_classes(), **args)


def test_bad_n_tasks_and_class_sets() -> None:
    sampler = FewShotSampler(coded_classes(), 5, 1, 1)
    for n in (0, -3, 1.5):
        with pytest.raises(ValueError, match="n_tasks must be a positive integer"):
            sampler.sample(n, gen(0))  # type: ignore[arg-type]
    good = coded_classes()
    with pytest.raises(ValueError, match="uint8"):
        ClassSet(good.images.to(torch.int16), good.index, good.quarter_turns, good.names)
    with pytest.raises(ValueError, match="one per name"):
        ClassSet(good.images, good.index[:3], good.quarter_turns, good.names)


def test_to_device_keeps_tasks() -> None:
    sampler = FewShotSampler(coded_classes(), 5, 1, 2, rotations=True)
    moved = sampler.to("cpu")
    assert moved.device == torch.device("cpu") and len(moved.classes) == 48
    assert torch.equal(moved.sample(3, gen(4)).query.x, sampler.sample(3, gen(4)).query.x)


def test_omniglot_sized_meta_batch() -> None:
    """The workload whose speed ``benchmarks/bench_data.py`` measures: 1623 characters, four
    rotations each, a meta-batch of 32 5-way 1-shot tasks with 15 queries per class."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1623, 20, 28, 28), generator=g, dtype=torch.uint8)
    names = tuple(f"A/character{c}/rot000" for c in range(1623))
    classes = ClassSet(images, torch.arange(1623), torch.zeros(1623, dtype=torch.int64), names)
    sampler = FewShotSampler(classes, 5, 1, 15, rotations=True)
    assert len(sampler.classes) == 4 * 1623
    task = sampler.sample(32, g)
    assert task.support.x.shape == (32, 5, 1, 28, 28) and task.query.x.shape == (32, 75, 1, 28, 28)
    assert torch.equal(task.support.y, torch.arange(5).expand(32, -1))
