"""CIFAR-FS and FC100 on a small CIFAR-100 written as the official python version (real names)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from image_fixtures import (
    CIFAR100_COARSE,
    CIFAR100_FINE,
    FINE_TO_COARSE,
    Evil,
    decode_codes,
    make_cifar100,
    py2_pickle,
    write_cifar,
)

from metagrad.data import CIFARFS, FC100, FewShotSampler, cifar, cifar_fs_splits, fc100_splits

SPLITS = ("train", "val", "test")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, make_cifar100(root), tmp_path_factory.mktemp("cache")


def test_cifar_fs_class_counts_names_and_images(cifar_root):
    root, images, cache = cifar_root
    sets = {s: CIFARFS(root, s, cache_dir=cache) for s in SPLITS}
    assert [len(sets[s]) for s in SPLITS] == [64, 16, 20]
    names = [set(sets[s].names) for s in SPLITS]
    assert set.union(*names) == set(CIFAR100_FINE) and sum(map(len, names)) == 100
    assert {"whale", "poppy", "pickup_truck"} <= names[2] and {"otter", "tractor"} <= names[1]
    for s in SPLITS:
        ds = sets[s]
        assert ds.image_shape == (3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.images.shape == (len(ds), 10, 3, 32, 32) and ds.counts.tolist() == [10] * len(ds)
        for c, name in enumerate(ds.names):  # training images first, each part in file order
            assert torch.equal(ds.images[c], torch.from_numpy(images[CIFAR100_FINE.index(name)]))
            assert ds.superclasses[c] == FINE_TO_COARSE[name]
    splits = cifar_fs_splits(root=root, cache_dir=cache)
    assert [len(splits[s]) for s in SPLITS] == [64, 16, 20]
    assert splits["test"].names == sets["test"].names


def test_fc100_superclass_split(cifar_root):
    root, images, cache = cifar_root
    sets = {s: FC100(root, s, cache_dir=cache) for s in SPLITS}
    assert [len(sets[s]) for s in SPLITS] == [60, 20, 20]
    supers = [set(sets[s].superclasses) for s in SPLITS]
    assert [len(x) for x in supers] == [12, 4, 4]
    assert set.union(*supers) == set(CIFAR100_COARSE)  # every superclass in exactly one split
    assert supers[2] == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    for s in SPLITS:
        ds = sets[s]
        assert list(ds.names) == [
            n for n in CIFAR100_FINE if FINE_TO_COARSE[n] in supers[SPLITS.index(s)]
        ]
        for c, name in enumerate(ds.names):
            assert ds.superclasses[c] == FINE_TO_COARSE[name]
            assert torch.equal(ds.images[c], torch.from_numpy(images[CIFAR100_FINE.index(name)]))
    splits = fc100_splits(root=root, cache_dir=cache)
    assert [len(splits[s]) for s in SPLITS] == [60, 20, 20]
    with pytest.raises(ValueError, match=r"unknown class split 'bertinetto' .* 'oreshkin'"):
        fc100_splits(root=root, split="bertinetto", cache_dir=cache)


def test_the_archive_the_folder_itself_and_python3_pickles_give_the_same_images(
    tmp_path, cifar_root
):
    root, images, cache = cifar_root
    want = CIFARFS(root, "val", cache_dir=cache)
    make_cifar100(tmp_path / "tar", layout="tar")
    make_cifar100(tmp_path / "py3", python2=False)  # bytes keys: b"data", b"fine_labels", ...
    for other in (tmp_path / "tar", root / "cifar-100-python", tmp_path / "py3"):
        got = CIFARFS(other, "val", cache_dir=tmp_path / "cache")
        assert got.names == want.names and torch.equal(got.images, want.images)


def test_sampler_on_cifar_fs(cifar_root):
    root, _, cache = cifar_root
    ds = CIFARFS(root, "train", cache_dir=cache)
    ways, shots, queries = 5, 3, 4
    sampler = FewShotSampler(ds.classes(), ways, shots, queries)
    task = sampler.sample(30, gen(0))
    assert task.support.x.shape == (30, ways * shots, 3, 32, 32)
    assert task.query.x.shape == (30, ways * queries, 3, 32, 32)
    assert task.query.x.dtype == torch.float32 and task.query.y.dtype == torch.int64
    for y in task.query.y:
        assert torch.bincount(y, minlength=ways).tolist() == [queries] * ways
    s_cls, s_idx, _ = decode_codes(task.support.x.view(30, ways, shots, 3, 32, 32))
    q_cls, q_idx, _ = decode_codes(task.query.x.view(30, ways, queries, 3, 32, 32))
    fine_of_row = [CIFAR100_FINE.index(n) for n in ds.names]
    for t in range(30):
        assert torch.all(s_cls[t] == s_cls[t, :, :1]) and torch.all(q_cls[t] == s_cls[t, :, :1])
        assert len(set(s_cls[t, :, 0].tolist())) == ways
        assert set(s_cls[t, :, 0].tolist()) <= set(fine_of_row)  # training classes only
        for j in range(ways):
            assert len(set(s_idx[t, j].tolist() + q_idx[t, j].tolist())) == shots + queries
    assert torch.equal(sampler.sample(30, gen(0)).query.x, task.query.x)
    assert not torch.equal(sampler.sample(30, gen(1)).query.x, task.query.x)


def test_one_cache_serves_both_and_is_read_on_the_second_load(tmp_path, monkeypatch):
    root, cache = tmp_path / "c", tmp_path / "cache"
    make_cifar100(root)
    first = CIFARFS(root, "test", cache_dir=cache)
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["cifar100"]

    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(cifar, "_decode", no_decoding)
    again = CIFARFS(root, "test", cache_dir=cache)
    assert torch.equal(again.images, first.images) and again.names == first.names
    assert len(FC100(root, "train", cache_dir=cache)) == 60  # the same cache
    assert sorted(p.name for p in root.iterdir()) == ["cifar-100-python"]  # nothing beside it


# bad inputs ---------------------------------------------------------------------------------------


def _files(train: int = 2, test: int = 1) -> dict[str, dict]:
    """The three pickled objects of a tiny, valid CIFAR-100 (for editing)."""

    def batch(n: int) -> dict:
        fine = [c for c in range(100) for _ in range(n)]
        coarse = [CIFAR100_COARSE.index(FINE_TO_COARSE[CIFAR100_FINE[c]]) for c in fine]
        data = np.zeros((len(fine), 3072), np.uint8)
        return {"data": data, "fine_labels": fine, "coarse_labels": coarse}

    meta = {"fine_label_names": list(CIFAR100_FINE), "coarse_label_names": list(CIFAR100_COARSE)}
    return {"train": batch(train), "test": batch(test), "meta": meta}


def _write(root, files) -> None:
    write_cifar(root, {k: v if isinstance(v, bytes) else py2_pickle(v) for k, v in files.items()})


def test_a_valid_hand_written_copy_loads(tmp_path):
    _write(tmp_path / "c", _files())
    assert len(CIFARFS(tmp_path / "c", "val", cache_dir=tmp_path / "cache")) == 16


def test_missing_files_name_the_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=r"cifar-100-python/ holding train, test and meta .*tar\.gz"
    ):
        CIFARFS(tmp_path / "empty", "train", cache_dir=tmp_path / "cache")
    _write(tmp_path / "c", _files())
    (tmp_path / "c" / "cifar-100-python" / "meta").unlink()
    with pytest.raises(ValueError, match="CIFAR-100 was not found"):
        FC100(tmp_path / "c", "train", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        CIFARFS(tmp_path / "c", "validation")


def _edit(files: dict, name: str, **changes) -> dict:
    out = {k: dict(v) for k, v in files.items()}
    out[name].update(changes)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: {**f, "meta": {"names": []}}, "meta lacks fine_label_names"),
        (lambda f: _edit(f, "meta", fine_label_names=list(CIFAR100_FINE[:99])), "names 99 classes"),
        (
            lambda f: _edit(
                f, "meta", fine_label_names=[*CIFAR100_FINE[:2], "babies", *CIFAR100_FINE[3:]]
            ),
            r"CIFAR-FS test list names \['baby'\], which cifar-100-python/meta lacks",
        ),
        (lambda f: {**f, "train": {"data": f["train"]["data"]}}, "train lacks data, fine_labels"),
        (
            lambda f: _edit(f, "train", data=np.zeros((200, 1024), np.uint8)),
            r"data is \(200, 1024\), not \(N, 3072\) uint8",
        ),
        (lambda f: _edit(f, "test", data=np.zeros((100, 3072), np.float32)), "uint8"),
        (lambda f: _edit(f, "test", fine_labels=[0] * 99), "99 fine and 100 coarse labels"),
        (lambda f: _edit(f, "test", fine_labels=[100] * 100), "outside 0..99"),
        (
            lambda f: _edit(
                f, "test", coarse_labels=[(c + 1) % 20 for c in f["test"]["coarse_labels"]]
            ),
            "two superclasses",
        ),
        (lambda f: {**f, "train": [1, 2, 3]}, "train lacks data"),
    ],
)
def test_wrong_contents(tmp_path, change, message):
    _write(tmp_path / "c", change(_files()))
    with pytest.raises(ValueError, match=message) as info:
        CIFARFS(tmp_path / "c", "test", cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_pickle(tmp_path, damage):
    files = {k: py2_pickle(v) for k, v in _files().items()}
    blob = files["train"]
    files["train"] = blob[: len(blob) // 3] if damage == "truncate" else os.urandom(len(blob))
    _write(tmp_path / "c", files)
    with pytest.raises(ValueError, match=r"cifar-100-python/train is not a readable pickle"):
        FC100(tmp_path / "c", "val", cache_dir=tmp_path / "cache")


def test_corrupt_archive(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cifar-100-python.tar.gz").write_bytes(os.urandom(3000))
    with pytest.raises(ValueError, match=r"cifar-100-python\.tar\.gz is not a readable \.tar\.gz"):
        CIFARFS(tmp_path / "c", "train", cache_dir=tmp_path / "cache")
    files = {k: py2_pickle(v) for k, v in _files().items()}
    del files["test"]
    write_cifar(tmp_path / "d", files, layout="tar")
    with pytest.raises(ValueError, match=r"holds no cifar-100-python/test"):
        CIFARFS(tmp_path / "d", "train", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["meta", "train", "test"])
def test_malicious_pickle_is_refused_without_running(tmp_path, name):
    marker = tmp_path / "pwned"
    files = {k: py2_pickle(v) for k, v in _files().items()}
    files[name] = pickle.dumps({"data": Evil(marker)}, protocol=2)
    _write(tmp_path / "c", files)
    with pytest.raises(ValueError, match=rf"cifar-100-python/{name} was refused: .*system"):
        CIFARFS(tmp_path / "c", "train", cache_dir=tmp_path / "cache")
    assert not marker.exists()
