"""Mini- and tiered-ImageNet on small files in their exact formats; the restricted unpickler; the
sampler on colour images, floating-point images and classes of unequal size."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from image_fixtures import (
    MINI_CLASSES,
    TIERED_SIZES,
    Evil,
    decode_codes,
    make_mini_folder,
    make_mini_pickles,
    make_tiered,
    py2_pickle,
)
from PIL import Image

import metagrad as mg
from metagrad.data import (
    ClassSet,
    FewShotSampler,
    MiniImageNet,
    TieredImageNet,
    imagenet,
    mini_imagenet_splits,
    tiered_imagenet_splits,
)
from metagrad.data import _pickle as restricted

SPLITS = ("train", "val", "test")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


# mini-ImageNet ------------------------------------------------------------------------------------


def test_mini_pickles_counts_shapes_and_images(tmp_path):
    data = make_mini_pickles(tmp_path / "mini")
    for split, n in MINI_CLASSES.items():
        ds = MiniImageNet(tmp_path / "mini", split, cache_dir=tmp_path / "cache")
        assert len(ds) == n and ds.image_shape == (3, 84, 84)
        assert ds.images.shape == (n, 12, 3, 84, 84) and ds.images.dtype == torch.uint8
        assert ds.names == tuple(sorted(data[split]["class_dict"]))
        assert ds.counts.tolist() == [12] * n
        for c, name in enumerate(ds.names):
            rows = data[split]["class_dict"][name]
            assert torch.equal(ds.images[c], chw(data[split]["image_data"][rows]))
    splits = mini_imagenet_splits(root=tmp_path / "mini", cache_dir=tmp_path / "cache")
    assert sorted(splits) == sorted(SPLITS)
    assert [len(splits[s]) for s in SPLITS] == [MINI_CLASSES[s] for s in SPLITS]
    names = [set(splits[s].names) for s in SPLITS]
    assert sum(map(len, names)) == len(set.union(*names))  # the splits share no class
    assert splits["train"].image_shape == (3, 84, 84) and splits["train"].drawings == 12


def test_mini_folder_is_decoded_like_pillow_and_the_pickle_is_read_first(tmp_path):
    root = tmp_path / "mini"
    rows = make_mini_folder(root)
    lanczos = getattr(Image, "Resampling", Image).LANCZOS
    for split in SPLITS:
        ds = MiniImageNet(root, split, cache_dir=tmp_path / "cache")
        assert ds.names == tuple(sorted({label for _, label in rows[split]}))
        assert ds.images.shape == (MINI_CLASSES[split], 8, 3, 84, 84)
        for c, name in enumerate(ds.names):
            files = [f for f, label in rows[split] if label == name]  # CSV order
            want = [
                np.asarray(Image.open(root / "images" / f).convert("RGB").resize((84, 84), lanczos))
                for f in files
            ]
            assert torch.equal(ds.images[c], chw(np.stack(want)))
    make_mini_pickles(root)  # both layouts present: the pickle wins
    ds = MiniImageNet(root, "train", cache_dir=tmp_path / "cache")
    assert ds.images.shape == (MINI_CLASSES["train"], 12, 3, 84, 84)


def test_sampler_on_mini_imagenet(tmp_path):
    make_mini_pickles(tmp_path / "mini", per_class=12)
    ds = MiniImageNet(tmp_path / "mini", "train", cache_dir=tmp_path / "cache")
    ways, shots, queries = 4, 2, 5
    sampler = FewShotSampler(ds.classes(), ways, shots, queries)
    assert sampler._store.data_ptr() == ds.images.data_ptr()  # a whole split: shared, not copied
    task = sampler.sample(40, gen(0))
    assert task.support.x.shape == (40, ways * shots, 3, 84, 84)
    assert task.query.x.shape == (40, ways * queries, 3, 84, 84)
    assert task.support.x.dtype == torch.float32 and task.query.y.dtype == torch.int64
    assert 0 <= float(task.support.x.min()) and float(task.support.x.max()) <= 1
    assert torch.equal(task.support.y, torch.arange(ways).repeat_interleave(shots).expand(40, -1))
    for y in task.query.y:
        assert torch.bincount(y, minlength=ways).tolist() == [queries] * ways  # label balance
    s_cls, s_idx, _ = decode_codes(task.support.x)
    q_cls, q_idx, _ = decode_codes(task.query.x)
    s_cls, s_idx = s_cls.view(40, ways, shots), s_idx.view(40, ways, shots)
    q_cls, q_idx = q_cls.view(40, ways, queries), q_idx.view(40, ways, queries)
    for t in range(40):
        assert torch.all(s_cls[t] == s_cls[t, :, :1]) and torch.all(q_cls[t] == s_cls[t, :, :1])
        assert len(set(s_cls[t, :, 0].tolist())) == ways
        for j in range(ways):  # support and query: distinct images of one class
            drawn = s_idx[t, j].tolist() + q_idx[t, j].tolist()
            assert len(set(drawn)) == shots + queries
    again = sampler.sample(40, gen(0))
    other = sampler.sample(40, gen(1))
    assert torch.equal(again.support.x, task.support.x) and torch.equal(again.query.x, task.query.x)
    assert not torch.equal(other.query.x, task.query.x)


def test_the_cache_is_read_on_the_second_load_and_renewed_when_the_source_changes(
    tmp_path, monkeypatch
):
    root, cache = tmp_path / "mini", tmp_path / "cache"
    make_mini_pickles(root)
    before = sorted(p.name for p in root.iterdir())
    first = MiniImageNet(root, "train", cache_dir=cache)
    assert len(list(cache.glob("mini-imagenet-train-*.npz"))) == 1
    assert sorted(p.name for p in root.iterdir()) == before  # nothing written beside the data

    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(imagenet, "_from_pickle", no_decoding)
    second = MiniImageNet(root, "train", cache_dir=cache)
    assert torch.equal(second.images, first.images) and second.names == first.names

    (cached,) = cache.glob("mini-imagenet-train-*.npz")
    blob = cached.read_bytes()
    cached.write_bytes(blob[: len(blob) // 2])  # a damaged cache is not trusted
    with pytest.raises(AssertionError, match="decoded again"):
        MiniImageNet(root, "train", cache_dir=cache)
    cached.write_bytes(blob)

    make_mini_pickles(root, seed=1)  # new content, size unchanged: the modification time tells
    stat = (root / "mini-imagenet-cache-train.pkl").stat()
    os.utime(
        root / "mini-imagenet-cache-train.pkl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9)
    )
    with pytest.raises(AssertionError, match="decoded again"):
        MiniImageNet(root, "train", cache_dir=cache)
    monkeypatch.undo()
    third = MiniImageNet(root, "train", cache_dir=cache)
    assert not torch.equal(third.images, first.images)
    assert len(list(cache.glob("mini-imagenet-train-*.npz"))) == 1  # the stale one removed


def test_cache_location_environment_and_unwritable_folder(tmp_path, monkeypatch):
    root = tmp_path / "mini"
    make_mini_pickles(root)
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "env-cache"))
    MiniImageNet(root, "val")
    assert len(list((tmp_path / "env-cache").glob("mini-imagenet-val-*.npz"))) == 1
    (tmp_path / "a-file").write_text("")
    with pytest.warns(UserWarning, match="could not write the cache"):
        ds = MiniImageNet(root, "test", cache_dir=tmp_path / "a-file" / "cache")
    assert len(ds) == MINI_CLASSES["test"]


# tiered-ImageNet ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["png", "npz"])
def test_tiered_counts_images_and_superclasses(tmp_path, variant):
    data = make_tiered(tmp_path / "tiered", variant)
    for split, sizes in TIERED_SIZES.items():
        ds = TieredImageNet(tmp_path / "tiered", split, cache_dir=tmp_path / "cache")
        d = data[split]
        assert ds.names == tuple(d["label_specific_str"])
        assert ds.counts.tolist() == list(sizes)
        assert ds.images.shape == (len(sizes), max(sizes), 3, 84, 84)
        for c, n in enumerate(sizes):
            mine = d["images"][d["label_specific"] == c]  # file order
            assert torch.equal(ds.images[c, :n], chw(mine))
            assert not ds.images[c, n:].any()  # padding
            general = d["label_general"][d["label_specific"] == c][0]
            assert ds.superclasses[c] == d["label_general_str"][general]
    splits = tiered_imagenet_splits(root=tmp_path / "tiered", cache_dir=tmp_path / "cache")
    assert [len(splits[s]) for s in SPLITS] == [len(TIERED_SIZES[s]) for s in SPLITS]
    assert splits["train"].drawings == min(TIERED_SIZES["train"])


def test_tiered_sampler_draws_every_valid_image_and_no_padding(tmp_path):
    make_tiered(tmp_path / "tiered")
    ds = TieredImageNet(tmp_path / "tiered", "train", cache_dir=tmp_path / "cache")
    sizes = TIERED_SIZES["train"]
    with pytest.raises(ValueError, match="exceeds the 6 drawings"):
        FewShotSampler(ds.classes(), 2, 3, 4)  # the smallest class has 6 images
    sampler = FewShotSampler(ds.classes(), 4, 2, 4)
    task = sampler.sample(300, gen(3))
    x = torch.cat(
        [task.support.x.view(300, 4, 2, 3, 84, 84), task.query.x.view(300, 4, 4, 3, 84, 84)], 2
    )
    cls, idx, marker = decode_codes(x)
    assert torch.all(marker == 255)  # never a padding row
    assert torch.all(cls == cls[:, :, :1])
    for t in range(300):
        for j in range(4):
            assert len(set(idx[t, j].tolist())) == 6
    seen = {(c, i) for c, i in zip(cls.flatten().tolist(), idx.flatten().tolist(), strict=True)}
    assert seen == {(c, i) for c, n in enumerate(sizes) for i in range(n)}


# bad inputs --------------------------------------------------------------------------------------


def _mini_pickle(root, obj, split="train") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(obj, protocol=4))


def test_mini_missing_files_name_the_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"mini-imagenet-cache-val\.pkl, or val\.csv .*images/"):
        MiniImageNet(tmp_path / "empty", "val", cache_dir=tmp_path / "cache")
    rows = make_mini_folder(tmp_path / "mini")
    (tmp_path / "mini" / "images" / rows["test"][3][0]).unlink()
    with pytest.raises(
        ValueError, match=rf"1 images of test\.csv are missing, e\.g\. .*{rows['test'][3][0]}"
    ):
        MiniImageNet(tmp_path / "mini", "test", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"unknown split 'training'"):
        MiniImageNet(tmp_path / "mini", "training")
    with pytest.raises(ValueError, match=r"unknown class split 'maml' .* 'ravi'"):
        mini_imagenet_splits(root=tmp_path / "mini", split="maml")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("filename;label\na.jpg;n01\n", "does not start with the header filename,label"),
        ("filename,label\n", "has no rows"),
        ("filename,label\na.jpg,n01,extra\n", "has the row 'a.jpg,n01,extra'"),
        ("filename,label\na.jpg,\n", "has the row"),
    ],
)
def test_mini_malformed_csv(tmp_path, content, message):
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    (root / "train.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        MiniImageNet(root, "train", cache_dir=tmp_path / "cache")


def test_mini_corrupt_image(tmp_path):
    rows = make_mini_folder(tmp_path / "mini")
    (tmp_path / "mini" / "images" / rows["val"][5][0]).write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=rf"{rows['val'][5][0]} cannot be decoded as an image"):
        MiniImageNet(tmp_path / "mini", "val", cache_dir=tmp_path / "cache")


def _good_mini():
    images = np.zeros((4, 84, 84, 3), dtype=np.uint8)
    return {"image_data": images, "class_dict": {"n01": [0, 1], "n02": [2, 3]}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: {"images": d["image_data"], "labels": d["class_dict"]}, "lacks image_data"),
        (lambda d: [d["image_data"]], "lacks image_data"),
        (lambda d: d | {"image_data": np.zeros((4, 32, 32, 3), np.uint8)}, r"not \(N, 84, 84, 3\)"),
        (lambda d: d | {"image_data": d["image_data"].astype(np.float32)}, "uint8"),
        (lambda d: d | {"class_dict": {"n01": [0, 9]}}, "outside image_data's 4"),
        (lambda d: d | {"class_dict": {"n01": "abc"}}, "not lists of"),
        (lambda d: d | {"class_dict": {}}, "not a non-empty dict"),
    ],
)
def test_mini_pickle_with_wrong_contents(tmp_path, change, message):
    _mini_pickle(tmp_path / "mini", change(_good_mini()))
    with pytest.raises(ValueError, match=message):
        MiniImageNet(tmp_path / "mini", "train", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_mini_truncated_or_corrupt_pickle(tmp_path, damage):
    _mini_pickle(tmp_path / "mini", _good_mini())
    path = tmp_path / "mini" / "mini-imagenet-cache-train.pkl"
    blob = path.read_bytes()
    path.write_bytes(
        {"truncate": blob[: len(blob) // 2], "garbage": os.urandom(500), "empty": b""}[damage]
    )
    with pytest.raises(
        ValueError, match=r"mini-imagenet-cache-train\.pkl is not a readable pickle"
    ):
        MiniImageNet(tmp_path / "mini", "train", cache_dir=tmp_path / "cache")


def test_malicious_mini_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    data = _good_mini() | {"class_dict": Evil(marker)}
    _mini_pickle(tmp_path / "mini", data)
    with pytest.raises(ValueError, match=r"mini-imagenet-cache-train\.pkl was refused: .*system"):
        MiniImageNet(tmp_path / "mini", "train", cache_dir=tmp_path / "cache")
    assert not marker.exists()
    assert not list(tmp_path.glob("cache/*"))  # and no cache written


def test_tiered_missing_files(tmp_path):
    make_tiered(tmp_path / "t")
    (tmp_path / "t" / "val_images_png.pkl").unlink()
    with pytest.raises(
        ValueError, match=r"val_labels\.pkl with val_images_png\.pkl or val_images\.npz"
    ):
        TieredImageNet(tmp_path / "t", "val", cache_dir=tmp_path / "cache")
    (tmp_path / "t" / "test_labels.pkl").unlink()
    with pytest.raises(ValueError, match=r"tiered-ImageNet's test split was not found"):
        TieredImageNet(tmp_path / "t", "test", cache_dir=tmp_path / "cache")


def _labels(n=6):
    return {
        "label_specific": np.array([0, 1, 0, 1, 2, 2][:n]),
        "label_general": np.array([0, 0, 0, 0, 1, 1][:n]),
        "label_specific_str": ["a", "b", "c"],
        "label_general_str": ["A", "B"],
    }


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({k: v for k, v in _labels().items() if k != "label_general"}, "lacks label_specific"),
        (_labels() | {"label_specific": np.array([0, 1, 0, 1, 2, 3])}, "exceeds its list"),
        (_labels() | {"label_general": np.array([0, 0, 0, 0, 1])}, "differ in length"),
        (_labels() | {"label_general": np.array([0, 1, 0, 0, 1, 1])}, "two superclasses"),
        (_labels() | {"label_specific_str": ["a", "b", "c", "d"]}, "a class has no images"),
        (_labels() | {"label_specific": "zero"}, "not integer arrays"),
    ],
)
def test_tiered_wrong_labels(tmp_path, labels, message):
    root = tmp_path / "t"
    root.mkdir()
    (root / "train_labels.pkl").write_bytes(py2_pickle(labels))
    np.savez(root / "train_images.npz", images=np.zeros((6, 84, 84, 3), np.uint8))
    with pytest.raises(ValueError, match=message):
        TieredImageNet(root, "train", cache_dir=tmp_path / "cache")


def _png(seed: int) -> np.ndarray:
    from image_fixtures import png_bytes

    image = np.random.default_rng(seed).integers(0, 256, (84, 84, 3), dtype=np.uint8)
    return np.frombuffer(png_bytes(image), dtype=np.uint8)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([_png(i) for i in range(5)], "holds 5 items for 6 labels"),
        ({"images": [_png(i) for i in range(6)]}, "holds"),
        ([1, 2, 3, 4, 5, 6], "not encoded images"),
        ([_png(0), _png(1), _png(2), np.zeros(30, np.uint8), _png(4), _png(5)], "image 3 of"),
    ],
)
def test_tiered_wrong_png_pickle(tmp_path, images, message):
    root = tmp_path / "t"
    root.mkdir()
    (root / "train_labels.pkl").write_bytes(py2_pickle(_labels()))
    (root / "train_images_png.pkl").write_bytes(py2_pickle(images))
    with pytest.raises(ValueError, match=message):
        TieredImageNet(root, "train", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["key", "shape", "dtype", "truncate", "garbage"])
def test_tiered_wrong_npz(tmp_path, damage):
    root = tmp_path / "t"
    root.mkdir()
    (root / "train_labels.pkl").write_bytes(py2_pickle(_labels()))
    good = np.zeros((6, 84, 84, 3), np.uint8)
    path = root / "train_images.npz"
    if damage == "key":
        np.savez(path, data=good)
    elif damage == "shape":
        np.savez(path, images=good[:, :80])
    elif damage == "dtype":
        np.savez(path, images=good.astype(np.float32))
    else:
        np.savez(path, images=good)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else os.urandom(len(blob)))
    message = {"key": "holds no array 'images'", "shape": r"\(6, 80, 84, 3\)", "dtype": "float32"}
    with pytest.raises(ValueError, match=message.get(damage, "train_images.npz is not a readable")):
        TieredImageNet(root, "train", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("which", ["labels", "images"])
def test_malicious_tiered_pickles_are_refused(tmp_path, which):
    root, marker = tmp_path / "t", tmp_path / "pwned"
    make_tiered(root)
    path = root / f"train_{'labels' if which == 'labels' else 'images_png'}.pkl"
    path.write_bytes(pickle.dumps([Evil(marker)], protocol=2))
    with pytest.raises(ValueError, match=rf"{path.name} was refused"):
        TieredImageNet(root, "train", cache_dir=tmp_path / "cache")
    assert not marker.exists()


# the restricted unpickler ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_unpickler_reads_arrays_and_containers_in_every_protocol(tmp_path, protocol):
    obj = {
        "u8": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        "f8": np.linspace(0, 1, 5),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "strings": np.array(["n01", "n02"]),
        "scalar": np.int64(7),
        "nested": [1, 2.5, ("a", None, True), {"k": [b"", b"xy"]}],
    }
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    got = restricted.load(path, "fix")
    assert got.keys() == obj.keys() and got["nested"] == obj["nested"] and got["scalar"] == 7
    for k in ("u8", "f8", "fortran", "strings"):
        assert got[k].dtype == obj[k].dtype and np.array_equal(got[k], obj[k])


def test_unpickler_reads_python2_pickles():
    data = {"data": np.arange(3072, dtype=np.uint8).reshape(1, 3072), "names": ["apple"]}
    got = restricted.load_bytes(py2_pickle(data), "meta", "fix")
    assert np.array_equal(got["data"], data["data"]) and got["names"] == ["apple"]


@pytest.mark.parametrize(
    "blob",
    [
        b"cos\nsystem\n(S'touch {marker}'\ntR.",  # protocol 0: os.system("touch ...")
        b'cbuiltins\neval\n(S\'open("{marker}", "w")\'\ntR.',
        b"csubprocess\ncall\n((S'touch'\nS'{marker}'\nltR.",
        b"cnumpy\nload\n(S'{marker}'\ntR.",  # a NumPy function, but not one for rebuilding arrays
        b"c_codecs\nencode\n(Vabc\nVrot13\ntR.",  # an admitted helper, used otherwise
    ],
)
def test_unpickler_refuses_other_globals_before_calling_them(tmp_path, blob):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(blob.replace(b"{marker}", str(marker).encode()))
    with pytest.raises(ValueError, match=r"evil\.pkl was refused: it names the global") as info:
        restricted.load(path, "use the original file")
    assert "\n" not in str(info.value) and str(info.value).endswith("use the original file")
    assert not marker.exists()


def test_a_plain_pickle_load_would_have_run_the_payload(tmp_path):
    """The control: the payload used above does run under ``pickle.load``."""
    marker = tmp_path / "ran"
    blob = pickle.dumps(Evil(marker))
    pickle.loads(blob)  # noqa: S301 - deliberately unsafe, to show the payload is live
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="was refused"):
        restricted.load_bytes(blob, "payload", "fix")
    assert not marker.exists()


# the sampler on other images ---------------------------------------------------------------------


def test_sampler_keeps_floating_point_images_and_refuses_other_dtypes():
    images = torch.rand(6, 5, 3, 4, 4, dtype=torch.float64, generator=gen(0))
    classes = ClassSet(images, torch.arange(6), torch.zeros(6, dtype=torch.int64), tuple("abcdef"))
    task = FewShotSampler(classes, 3, 2, 3).sample(4, gen(1))
    assert task.support.x.dtype == torch.float64 and task.support.x.shape == (4, 6, 3, 4, 4)
    flat = images.view(30, -1)
    for x in task.query.x.reshape(-1, 48):  # each drawn image is one stored image, unchanged
        assert bool((flat == x).all(1).any())
    for bad in (images.to(torch.int32), images[..., 0, 0]):
        with pytest.raises(ValueError, match="uint8 or floating point of shape"):
            ClassSet(bad, torch.arange(6), torch.zeros(6, dtype=torch.int64), tuple("abcdef"))
    for counts in (torch.tensor([5, 5, 5]), torch.tensor([5, 5, 0, 5, 5, 5]), torch.full((6,), 6)):
        with pytest.raises(ValueError, match="counts must be None or"):
            ClassSet(
                images, torch.arange(6), torch.zeros(6, dtype=torch.int64), tuple("abcdef"), counts
            )


def test_rotated_colour_classes_match_torch_rot90(tmp_path):
    make_mini_pickles(tmp_path / "mini")
    ds = MiniImageNet(tmp_path / "mini", "val", cache_dir=tmp_path / "cache")
    splits = mini_imagenet_splits(root=tmp_path / "mini", rotations=True, cache_dir=tmp_path / "c")
    assert len(splits["val"]) == 4 * len(ds) and splits["val"].names[1] == f"{ds.names[0]}/rot090"
    one = ds.classes([f"{ds.names[2]}/rot270"])
    task = FewShotSampler(one, 1, 1, 11).sample(1, gen(0))
    got = torch.cat([task.support.x[0], task.query.x[0]])
    want = torch.rot90(ds.images[2], 3, dims=(-2, -1)).float() / 255
    assert sorted(map(tuple, got.flatten(1).tolist())) == sorted(
        map(tuple, want.flatten(1).tolist())
    )
    rebuilt = ds.classes(splits["val"].to_json())
    assert rebuilt.names == splits["val"].names
    assert torch.equal(rebuilt.quarter_turns, splits["val"].quarter_turns)
    with pytest.raises(ValueError, match=r"unknown class 'n99' in the val split"):
        ds.classes(["n99"])


def test_every_public_loader_is_exported():
    for name in ("MiniImageNet", "TieredImageNet", "CIFARFS", "FC100"):
        assert hasattr(mg.data, name) and name in mg.data.__all__
    assert mg.models.ResNet12 is not None and "resnet12" in mg.models.MODELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import metagrad.data._pickle  # noqa: F401  (no NumPy deprecation warning on import)


def test_worker_processes_decode_like_one_process():
    from image_fixtures import png_bytes

    from metagrad.data import _images

    rng = np.random.default_rng(0)
    blobs = [png_bytes(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)) for _ in range(600)]
    labels = rng.integers(0, 3, 600)
    slot, counts = _images.slots(labels, 3)
    outs = []
    for workers in (1, 2):  # above 500 images, 2 workers means a process pool
        out = np.zeros((3, int(counts.max()), 3, 84, 84), dtype=np.uint8)
        _images.decode_into(out, (labels, slot), blobs, str, "test", workers)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    first = int(np.flatnonzero(labels == 1)[0])  # class 1's first image, in its slot 0
    assert np.array_equal(outs[1][1, 0], _images.decode_image(blobs[first], 84).transpose(2, 0, 1))
    bad = [*blobs[:550], b"broken", *blobs[551:]]
    with pytest.raises(ValueError, match="^550 cannot be decoded as an image"):
        _images.decode_into(np.zeros_like(outs[0]), (labels, slot), bad, str, "test", 2)
