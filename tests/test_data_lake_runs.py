"""Lake's one-shot runs: the official format written by make_lake_runs and read by LakeRuns."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from data_fixtures import full_omniglot, make_omniglot  # noqa: F401

import metagrad as mg
from metagrad.data import LakeRuns, Omniglot, make_lake_runs


@pytest.fixture
def small(tmp_path: Path) -> Omniglot:
    return Omniglot(make_omniglot(tmp_path / "omniglot"), cache_dir=tmp_path / "cache")


def origins(ds: Omniglot) -> dict[bytes, set[tuple[int, int]]]:
    """Every (character, drawing) of ``ds`` by the bytes of its image."""
    found: dict[bytes, set[tuple[int, int]]] = {}
    for c in range(len(ds)):
        for d in range(ds.images.shape[1]):
            found.setdefault(ds.images[c, d].numpy().tobytes(), set()).add((c, d))
    return found


def check_run(ds: Omniglot, task: mg.Task, ways: int, found=None) -> str:
    """A run is one alphabet's characters, one drawer per side, each item labelled by its class."""
    assert task.support.x.shape == task.query.x.shape == (ways, 1, 28, 28)
    assert torch.equal(task.support.y, torch.arange(ways))
    assert sorted(task.query.y.tolist()) == list(range(ways))
    found = found or origins(ds)

    def origin(x: torch.Tensor) -> set[tuple[int, int]]:
        return found[(x[0] * 255).round().to(torch.uint8).numpy().tobytes()]

    train = [origin(x) for x in task.support.x]
    test = [origin(x) for x in task.query.x]
    train_chars = [{c for c, _ in hit} for hit in train]
    for hits, label in zip(test, task.query.y.tolist(), strict=True):
        assert {c for c, _ in hits} & train_chars[label]  # the same character as its class
    train_drawers = set.intersection(*({d for _, d in hit} for hit in train))
    test_drawers = set.intersection(*({d for _, d in hit} for hit in test))
    assert train_drawers and test_drawers and train_drawers != test_drawers
    alphabets = {ds.alphabet[c] for hit in train for c, _ in hit}
    assert len(alphabets) == 1 and not ds.background[ds.characters(alphabets.pop())[0]]
    assert len({min(c for c, _ in hit) for hit in train}) == ways  # distinct characters
    return ds.alphabet[next(iter(train[0]))[0]]


@pytest.mark.parametrize("name", ["runs", "all_runs.zip"])
def test_round_trip_on_a_small_copy(small: Omniglot, tmp_path: Path, name: str) -> None:
    out = make_lake_runs(small, tmp_path / name, seed=0, alphabets=1, ways=3)
    runs = LakeRuns(out)
    assert len(runs) == 2 and runs.names == ("run01", "run02")
    for task in runs:
        check_run(small, task, ways=3)
    stacked = runs.task()
    assert stacked.support.x.shape == (2, 3, 1, 28, 28) and stacked.query.y.shape == (2, 3)


def test_written_format_is_the_official_one(small: Omniglot, tmp_path: Path) -> None:
    out = make_lake_runs(small, tmp_path / "runs", seed=1, alphabets=1, runs_per_alphabet=1, ways=4)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == (
        ["run01/class_labels.txt"]
        + [f"run01/test/item{i:02d}.png" for i in range(1, 5)]
        + [f"run01/training/class{i:02d}.png" for i in range(1, 5)]
    )
    lines = (out / "run01" / "class_labels.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [
        f"run01/test/item{i:02d}.png" for i in range(1, 5)
    ]
    assert sorted(line.split()[1] for line in lines) == [
        f"run01/training/class{i:02d}.png" for i in range(1, 5)
    ]


def test_labels_relative_to_the_run_folder_and_a_top_folder(small: Omniglot, tmp_path) -> None:
    made = make_lake_runs(small, tmp_path / "runs", seed=2, alphabets=1, ways=3)
    moved = tmp_path / "outer" / "all_runs"
    shutil.copytree(made, moved)
    labels = moved / "run02" / "class_labels.txt"
    labels.write_text(labels.read_text().replace("run02/", ""))
    a, b = LakeRuns(made), LakeRuns(tmp_path / "outer")
    for u, v in zip(a.task(), b.task(), strict=True):
        assert all(torch.equal(s, t) for s, t in zip(u, v, strict=True))


def test_make_lake_runs_is_seeded(small: Omniglot, tmp_path: Path) -> None:
    tasks = [
        LakeRuns(make_lake_runs(small, tmp_path / f"r{i}", seed=s, alphabets=1, ways=3)).task()
        for i, s in enumerate([5, 5, 6])
    ]
    assert torch.equal(tasks[0].query.x, tasks[1].query.x)
    assert not torch.equal(tasks[0].query.x, tasks[2].query.x)


def test_bad_runs_input(small: Omniglot, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="all_runs.zip") as err:
        LakeRuns(tmp_path / "missing")
    assert "make_lake_runs" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no runNN/class_labels.txt"):
        LakeRuns(tmp_path / "empty")
    out = make_lake_runs(small, tmp_path / "runs", seed=0, alphabets=1, ways=3)
    labels = out / "run01" / "class_labels.txt"
    good = labels.read_text()
    labels.write_text("\n".join(good.splitlines()[:-1]))
    with pytest.raises(ValueError, match="every test item needs one line"):
        LakeRuns(out)
    labels.write_text(good.replace("class01", "class09"))
    with pytest.raises(ValueError, match="names a missing image"):
        LakeRuns(out)
    labels.write_text("run01/test/item01.png\n")
    with pytest.raises(ValueError, match="class_labels.txt:1: expected"):
        LakeRuns(out)
    with pytest.raises(FileExistsError, match="exists"):
        make_lake_runs(small, out, seed=0, alphabets=1, ways=3)
    with pytest.raises(ValueError, match="1 alphabets qualify"):
        make_lake_runs(small, tmp_path / "more", alphabets=2, ways=3)


def test_corrupt_runs_zip_is_reported_and_left_in_place(tmp_path: Path) -> None:
    bad = tmp_path / "all_runs.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ValueError, match="corrupt zip"):
        LakeRuns(bad)
    assert bad.read_bytes() == b"PK\x03\x04 this is not a zip"  # the user's file, not moved
    assert [p.name for p in tmp_path.iterdir()] == ["all_runs.zip"]


@pytest.mark.slow
def test_twenty_runs_from_the_evaluation_alphabets(full_omniglot, tmp_path) -> None:  # noqa: F811
    runs = LakeRuns(make_lake_runs(full_omniglot, tmp_path / "all_runs.zip", seed=0))
    assert len(runs) == 20 and runs.task().support.x.shape == (20, 20, 1, 28, 28)
    found = origins(full_omniglot)
    alphabets = [check_run(full_omniglot, task, 20, found) for task in runs]
    assert len(set(alphabets)) == 10 and all(alphabets.count(a) == 2 for a in alphabets)
