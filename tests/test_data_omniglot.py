"""Omniglot on the shared full copy (skipped without $METAGRAD_OMNIGLOT) and the split API.

The tests on the full copy are marked slow: the first of them decodes all 32,460 drawings (once per
session). Load and sampling speeds are measured by ``benchmarks/bench_data.py``, not asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import full_omniglot, full_omniglot_info, make_omniglot  # noqa: F401

from metagrad.data import FewShotSampler, Omniglot, _source, alphabet_tasks
from metagrad.data._splits import vinyals_list

SPLITS = ("train", "val", "test")
slow = pytest.mark.slow


def characters(classes) -> set[int]:
    return set(classes.index.tolist())


@slow
def test_counts(full_omniglot: Omniglot) -> None:  # noqa: F811
    ds = full_omniglot
    assert len(ds) == 1623 and len(ds.alphabets) == 50
    assert sum(ds.background) == 964 and len(ds) - sum(ds.background) == 659
    assert len({a for a, b in zip(ds.alphabet, ds.background, strict=True) if b}) == 30
    assert sorted(ds.ids) == list(range(1, 1624))
    assert ds.images.shape == (1623, 20, 28, 28) and ds.images.dtype == torch.uint8
    for alphabet in ds.alphabets:  # id = the alphabet's first id + KK - 1
        idx = ds.characters(alphabet)
        first = ds.ids[idx[0]]
        assert [ds.ids[i] for i in idx] == list(range(first, first + len(idx)))
        assert [ds.names[i] for i in idx] == [f"character{k:02d}" for k in range(1, len(idx) + 1)]


@slow
def test_images_strokes_and_known_quirk(full_omniglot: Omniglot) -> None:  # noqa: F811
    ds = full_omniglot
    border = torch.cat([ds.images[:, :, 0], ds.images[:, :, -1]], dim=-1).float()
    assert float(border.mean()) < 10 and float(ds.images.float().mean()) > 10  # ink is high
    braille = ds.ids.index(192)
    assert ds.alphabet[braille] == "Braille" and ds.names[braille] == "character01"
    assert torch.equal(ds.images[braille, 2], ds.images[braille, 18])  # drawings 03 and 19
    char = ds[braille]
    assert char.images.shape == (20, 1, 28, 28) and float(char.images.max()) == 1.0


@slow
def test_second_load_reads_the_cache(full_omniglot, full_omniglot_info, monkeypatch) -> None:  # noqa: F811
    """The second load reads the first one's cache and decodes nothing (its speed against the
    first load is measured by ``benchmarks/bench_data.py``)."""

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(_source, "decode_all", fail)
    cache = full_omniglot_info["cache"]
    again = Omniglot(full_omniglot.root, cache_dir=cache)
    assert torch.equal(again.images, full_omniglot.images) and again.names == full_omniglot.names
    assert len(list(cache.glob("omniglot-*.npz"))) == 1


@slow
def test_maml_split(full_omniglot: Omniglot) -> None:  # noqa: F811
    ds = full_omniglot
    split = ds.split("maml", seed=0)
    sizes = {name: len(characters(split[name])) for name in SPLITS}
    assert sizes == {"train": 1100, "val": 100, "test": 423}
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (4400, 100, 423)
    assert len(split["trainval"]) == 4800
    parts = [characters(split[name]) for name in SPLITS]
    assert set.union(*parts) == set(range(1623)) and sum(map(len, parts)) == 1623
    again = ds.split("maml", seed=0)
    assert all(again[name].names == split[name].names for name in split)
    assert ds.split("maml", seed=1)["test"].names != split["test"].names
    plain = ds.split("maml", rotations=False)
    assert len(plain["train"]) == 1100 and characters(plain["train"]) == parts[0]
    only_test = ds.split("maml", rotations={"test"})
    assert (len(only_test["train"]), len(only_test["test"])) == (1100, 1692)


@slow
def test_split_round_trips_through_json(full_omniglot: Omniglot) -> None:  # noqa: F811
    import json

    split = full_omniglot.split("maml", seed=3)
    saved = json.loads(json.dumps({name: s.to_json() for name, s in split.items()}))
    rebuilt = {name: full_omniglot.classes(names) for name, names in saved.items()}
    for name in split:
        assert rebuilt[name].names == split[name].names
        assert torch.equal(rebuilt[name].index, split[name].index)
        assert torch.equal(rebuilt[name].quarter_turns, split[name].quarter_turns)
    assert saved["train"][1] == saved["train"][0][:-3] + "090"


@slow
def test_vinyals_split_is_the_published_lists(full_omniglot: Omniglot) -> None:  # noqa: F811
    ds = full_omniglot
    split = ds.split("vinyals")
    listed = {name: (ds.root / "splits" / "vinyals" / f"{name}.txt") for name in SPLITS}
    for name in SPLITS:
        if listed[name].exists():
            assert list(split[name].names) == listed[name].read_text().split()
            assert vinyals_list(Path("/nonexistent"), name) == listed[name].read_text().split()
    assert [len(characters(split[n])) for n in SPLITS] == [1028, 172, 423]
    assert [len(split[n]) for n in SPLITS] == [4112, 688, 1692]
    parts = [characters(split[name]) for name in SPLITS]
    assert set.union(*parts) == set(range(1623))
    assert [len(s) for s in ds.split("vinyals", rotations=False).values()] == [1028, 172, 423, 1200]


@slow
def test_lake_split(full_omniglot: Omniglot) -> None:  # noqa: F811
    ds = full_omniglot
    split = ds.split("lake", seed=0)
    assert len(split["trainval"]) == 964 and len(split["test"]) == 659
    assert len(split["train"]) + len(split["val"]) == 964
    val_alphabets = {ds.alphabet[i] for i in characters(split["val"])}
    train_alphabets = {ds.alphabet[i] for i in characters(split["train"])}
    assert len(val_alphabets) == 5 and not val_alphabets & train_alphabets
    assert all(ds.background[i] for i in characters(split["trainval"]))
    assert not any(ds.background[i] for i in characters(split["test"]))
    assert not bool(split["train"].quarter_turns.any())  # no rotations by default
    assert len(ds.split("lake", rotations=True)["test"]) == 4 * 659


@slow
def test_sampler_on_a_split_draws_only_its_characters(full_omniglot: Omniglot) -> None:  # noqa: F811
    ds = full_omniglot
    test = ds.split("maml")["test"]
    allowed = {ds.images[c, d].numpy().tobytes() for c in characters(test) for d in range(20)}
    for ways, shots, queries in [(5, 1, 15), (20, 5, 15)]:
        task = FewShotSampler(test, ways, shots, queries).sample(4, torch.Generator())
        assert task.support.x.shape == (4, ways * shots, 1, 28, 28)
        assert task.query.x.shape == (4, ways * queries, 1, 28, 28)
        for x in torch.cat([task.support.x, task.query.x], dim=1).flatten(0, 1):
            assert (x[0] * 255).round().to(torch.uint8).numpy().tobytes() in allowed


@slow
def test_alphabet_tasks(full_omniglot: Omniglot) -> None:  # noqa: F811
    ds = full_omniglot
    tasks = alphabet_tasks(ds)
    big = [a for a in ds.alphabets if len(ds.characters(a)) >= 20]
    assert list(tasks) == big and len(tasks) == 46
    task = tasks["Tifinagh"]
    assert task.support.x.shape == (300, 1, 28, 28) and task.query.x.shape == (100, 1, 28, 28)
    assert torch.equal(task.support.y, torch.arange(20).repeat_interleave(15))
    assert torch.equal(task.query.y, torch.arange(20).repeat_interleave(5))
    members = set(ds.characters("Tifinagh"))
    held = {ds.images[c, d].numpy().tobytes() for c in members for d in range(5)}
    train = {ds.images[c, d].numpy().tobytes() for c in members for d in range(5, 20)}
    for x, pool in [(task.query.x, held), (task.support.x, train)]:
        assert all((i[0] * 255).round().byte().numpy().tobytes() in pool for i in x)
    some = alphabet_tasks(ds, ["Tifinagh", "Blackfoot_(Canadian_Aboriginal_Syllabics)"])
    assert list(some) == ["Tifinagh"]  # 14 characters: skipped
    assert torch.equal(some["Tifinagh"].support.x, task.support.x)  # independent of the others
    assert not torch.equal(
        alphabet_tasks(ds, ["Tifinagh"], seed=1)["Tifinagh"].support.x, task.support.x
    )


@slow
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alphabets": ["Klingon"]}, "unknown alphabet 'Klingon'"),
        ({"classes": 0}, "classes must be a positive integer"),
        ({"held_out": 20}, r"held_out must be in 1..19"),
        ({"classes": 100}, "at least classes=100 characters"),
    ],
)
def test_alphabet_tasks_bad_input(full_omniglot: Omniglot, kwargs: dict, message: str) -> None:  # noqa: F811
    with pytest.raises(ValueError, match=message):
        alphabet_tasks(full_omniglot, **kwargs)


def test_split_errors_on_a_small_copy(tmp_path: Path) -> None:
    layout = {"images_background": {"A": 2, "B": 2, "C": 1}, "images_evaluation": {"D": 2}}
    ds = Omniglot(make_omniglot(tmp_path / "o", layout), cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="maml split needs more than 1200 characters"):
        ds.split("maml")
    with pytest.raises(ValueError, match="unknown split protocol 'bogus'"):
        ds.split("bogus")
    with pytest.raises(ValueError, match="unknown class 'Angelic/character01'"):
        ds.split("vinyals")  # its lists name characters this copy lacks
    lake = ds.split("lake", seed=0)
    assert len(lake["val"]) in (1, 2) and len(lake["trainval"]) == 5 and len(lake["test"]) == 2
    with pytest.raises(ValueError, match="unknown class 'Z/character01'"):
        ds.classes(["Z/character01/rot000"])
    assert ds.classes(["A/character02"]).names == ("A/character02/rot000",)
    with pytest.raises(ValueError, match="exceeds the 2 classes"):
        FewShotSampler(lake["test"], 5, 1, 1)
