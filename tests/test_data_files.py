"""Omniglot's files on small fixtures: the cache, the download, corrupt and missing input."""

from __future__ import annotations

import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import local_server, make_omniglot, md5, zip_folder  # noqa: F401

from metagrad.data import Omniglot, _source
from metagrad.data import omniglot as omniglot_module
from metagrad.data._files import check_member, default_cache_dir
from metagrad.data._source import CorruptSourceError

TOPS = ("images_background", "images_evaluation")


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only 127.0.0.1 may be reached from these tests."""
    connect = socket.create_connection

    def local_only(address, *args, **kwargs):
        if address[0] not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"a test tried to reach {address}")
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", local_only)


def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(_source, "decode_all", fail)


@pytest.mark.parametrize("zipped", [False, True])
def test_small_copy_loads_and_is_cached(tmp_path: Path, zipped: bool, monkeypatch) -> None:
    root = make_omniglot(tmp_path / "omniglot", zipped=zipped)
    cache = tmp_path / "cache"
    ds = Omniglot(root, cache_dir=cache)
    assert len(ds) == 9 and ds.alphabets == ("Alpha", "Beta", "Gamma")
    assert ds.images.shape == (9, 20, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.ids == tuple(range(1, 10)) and ds.background == (True,) * 5 + (False,) * 4
    char = ds[5]
    assert (char.alphabet, char.name, char.id, char.background) == (
        "Gamma",
        "character01",
        6,
        False,
    )
    assert char.images.shape == (20, 1, 28, 28) and char.images.dtype == torch.float32
    # background is 0, strokes are high
    assert float(char.images[:, :, 0, 0].max()) == 0.0 and float(char.images.max()) > 0.9
    files = list(cache.glob("omniglot-*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as data:  # loads without pickle
        assert data["images"].shape == (9, 20, 28, 28)
    no_decode(monkeypatch)
    again = Omniglot(root, cache_dir=cache)
    assert torch.equal(again.images, ds.images) and again.names == ds.names


def test_zip_and_folder_decode_the_same(tmp_path: Path) -> None:
    a = Omniglot(make_omniglot(tmp_path / "a"), cache_dir=tmp_path / "c")
    b = Omniglot(make_omniglot(tmp_path / "b", zipped=True), cache_dir=tmp_path / "c")
    assert torch.equal(a.images, b.images)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2  # one per root


def test_a_zip_is_read_before_its_folder(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "both")
    zipped = make_omniglot(tmp_path / "zips", zipped=True)
    for top in TOPS:
        os.replace(zipped / f"{top}.zip", root / f"{top}.zip")
    from PIL import Image

    Image.new("1", (105, 105), 0).save(root / TOPS[0] / "Alpha" / "character01" / "0001_01.png")
    ds = Omniglot(root, cache_dir=tmp_path / "c")
    assert int(ds.images[0, 0].min()) == 0  # the zip's drawing, not the blackened file


@pytest.mark.parametrize("zipped", [False, True])
def test_cache_is_rebuilt_when_the_source_changes(tmp_path: Path, zipped: bool) -> None:
    root = make_omniglot(tmp_path / "omniglot")
    cache = tmp_path / "cache"
    if zipped:
        zip_folder(root / TOPS[1], root / f"{TOPS[1]}.zip")
    before = Omniglot(root, cache_dir=cache)
    png = root / TOPS[0] / "Alpha" / "character01" / "0001_01.png"
    from PIL import Image

    Image.new("1", (105, 105), 0).save(png)  # all black: a full stroke everywhere
    os.utime(png, ns=(1, 1))
    if zipped:
        (root / f"{TOPS[1]}.zip").unlink()
        make_omniglot(tmp_path / "other", zipped=True)
        os.replace(tmp_path / "other" / f"{TOPS[1]}.zip", root / f"{TOPS[1]}.zip")
    after = Omniglot(root, cache_dir=cache)
    assert int(after.images[0, 0].min()) == 255 and not torch.equal(before.images, after.images)
    assert len(list(cache.glob("omniglot-*.npz"))) == 1  # the stale cache was removed


def test_default_cache_dir_and_a_broken_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    root = make_omniglot(tmp_path / "omniglot")
    ds = Omniglot(root)
    (cached,) = (tmp_path / "env-cache").glob("omniglot-*.npz")
    cached.write_bytes(b"not an npz")  # a damaged cache is ours: rebuilt, not an error
    assert torch.equal(Omniglot(root).images, ds.images)
    monkeypatch.delenv("METAGRAD_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "metagrad"


def test_unwritable_cache_warns_and_still_loads(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "omniglot")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not write the Omniglot cache"):
        ds = Omniglot(root, cache_dir=blocker / "cache")
    assert len(ds) == 9


def test_missing_root_names_files_place_and_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        Omniglot(tmp_path / "nowhere", cache_dir=tmp_path / "c")
    message = str(err.value)
    for part in ("images_background.zip", "images_evaluation.zip", "--data", "nowhere"):
        assert part in message
    assert "download=True" not in message  # the command line has no such flag
    root = make_omniglot(tmp_path / "half", {"images_background": {"Alpha": 1}})
    with pytest.raises(FileNotFoundError, match="images_evaluation.zip") as err:
        Omniglot(root, cache_dir=tmp_path / "c")
    assert "images_background.zip" not in str(err.value)


def test_incomplete_character_is_refused(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "omniglot")
    (root / TOPS[1] / "Gamma" / "character02" / "0007_13.png").unlink()
    with pytest.raises(ValueError, match="Gamma/character02 must hold 20 drawings"):
        Omniglot(root, cache_dir=tmp_path / "c")


def test_unexpected_layout_is_refused(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "omniglot")
    (root / TOPS[0] / "Alpha" / "stray.png").write_bytes(b"")
    with pytest.raises(ValueError, match="unexpected file 'Alpha/stray.png'"):
        Omniglot(root, cache_dir=tmp_path / "c")


def test_corrupt_user_zip_is_reported_left_in_place_and_never_used(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "omniglot", zipped=True)
    bad = root / f"{TOPS[0]}.zip"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated
    before = bad.read_bytes()
    with pytest.raises(CorruptSourceError, match="corrupt") as err:
        Omniglot(root, cache_dir=tmp_path / "c")
    assert str(bad) in str(err.value) and "never moved" in str(err.value)
    assert bad.read_bytes() == before and not list(root.glob("*.corrupt*"))  # the user's file
    with pytest.raises(CorruptSourceError, match="corrupt"):
        Omniglot(root, cache_dir=tmp_path / "c")  # not used, not silently replaced


def test_bad_crc_inside_a_zip_is_caught(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "omniglot", zipped=True)
    bad = root / f"{TOPS[1]}.zip"
    with zipfile.ZipFile(bad) as archive:
        info = archive.getinfo(f"{TOPS[1]}/Gamma/character03/0008_05.png")
    data = bytearray(bad.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptSourceError, match="0008_05.png") as err:
        Omniglot(root, cache_dir=tmp_path / "c")
    assert "never moved" in str(err.value) and bad.read_bytes() == bytes(data)


def test_bad_drawing_found_by_the_worker_pool(tmp_path: Path) -> None:
    layout = {TOPS[0]: {"Alpha": 40}, TOPS[1]: {"Gamma": 15}}  # > 50 characters: a pool decodes
    root = make_omniglot(tmp_path / "omniglot", layout)
    (root / TOPS[1] / "Gamma" / "character09" / "0049_17.png").write_bytes(b"not a png")
    for top in TOPS:
        zip_folder(root / top, root / f"{top}.zip")
    with pytest.raises(CorruptSourceError, match="0049_17.png") as err:
        Omniglot(root, cache_dir=tmp_path / "c")
    assert "never moved" in str(err.value) and (root / f"{TOPS[1]}.zip").exists()
    assert (root / f"{TOPS[0]}.zip").exists() and not list(root.glob("*.corrupt*"))


def test_undecodable_png_in_a_folder_is_named(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "omniglot")
    png = root / TOPS[0] / "Beta" / "character01" / "0004_02.png"
    png.write_bytes(b"not a png")
    with pytest.raises(CorruptSourceError, match="0004_02.png"):
        Omniglot(root, cache_dir=tmp_path / "c")
    assert png.exists()  # a user's folder is reported, not rearranged


def test_unsafe_zip_entries_are_refused() -> None:
    for name in ("../evil.png", "/abs/evil.png", "a/../../evil.png", "C:/evil.png", "..\\x.png"):
        with pytest.raises(ValueError, match="unsafe zip entry"):
            check_member(name)
    assert check_member("images_background/A/character01/0001_01.png").parts[0] == TOPS[0]


def serve_small_zips(tmp_path: Path, folder: Path, base: str, monkeypatch) -> dict[str, str]:
    made = make_omniglot(tmp_path / "source", zipped=True)
    sums = {}
    for top in TOPS:
        os.replace(made / f"{top}.zip", folder / f"{top}.zip")
        sums[top] = md5(folder / f"{top}.zip")
        monkeypatch.setitem(omniglot_module.URLS, top, f"{base}/{top}.zip")
        monkeypatch.setitem(omniglot_module.MD5, top, sums[top])
    return sums


def test_download_checks_md5_and_extracts(tmp_path: Path, local_server, monkeypatch) -> None:  # noqa: F811
    base, folder = local_server
    serve_small_zips(tmp_path, folder, base, monkeypatch)
    root = tmp_path / "downloaded"
    ds = Omniglot(root, download=True, cache_dir=tmp_path / "c")
    assert len(ds) == 9
    for top in TOPS:
        assert (root / f"{top}.zip").is_file() and (root / top).is_dir()
    assert not list(root.glob("*.part")) and not list(root.glob(".*extract*"))
    expected = Omniglot(make_omniglot(tmp_path / "expected"), cache_dir=tmp_path / "c2")
    assert torch.equal(ds.images, expected.images)


def test_download_with_bad_checksum_is_moved_aside(
    tmp_path: Path,
    local_server,  # noqa: F811
    monkeypatch,
) -> None:
    base, folder = local_server
    serve_small_zips(tmp_path, folder, base, monkeypatch)
    monkeypatch.setitem(omniglot_module.MD5, TOPS[0], "0" * 32)
    root = tmp_path / "downloaded"
    with pytest.raises(ValueError, match="checksum mismatch"):
        Omniglot(root, download=True, cache_dir=tmp_path / "c")
    assert (root / f"{TOPS[0]}.zip.corrupt").is_file()
    assert not (root / f"{TOPS[0]}.zip").exists() and not list(root.glob("*.part"))


def test_download_of_an_unsafe_zip_is_refused(tmp_path: Path, local_server, monkeypatch) -> None:  # noqa: F811
    base, folder = local_server
    serve_small_zips(tmp_path, folder, base, monkeypatch)
    evil = folder / f"{TOPS[0]}.zip"
    with zipfile.ZipFile(evil, "a") as archive:
        archive.writestr("../escaped.png", b"x")
    monkeypatch.setitem(omniglot_module.MD5, TOPS[0], md5(evil))
    root = tmp_path / "downloaded"
    with pytest.raises(ValueError, match="unsafe zip entry"):
        Omniglot(root, download=True, cache_dir=tmp_path / "c")
    assert not (tmp_path / "escaped.png").exists() and not (root / TOPS[0]).exists()
    assert (root / f"{TOPS[0]}.zip.corrupt").exists()


def test_download_failure_leaves_nothing(tmp_path: Path, local_server, monkeypatch) -> None:  # noqa: F811
    base, folder = local_server
    serve_small_zips(tmp_path, folder, base, monkeypatch)
    monkeypatch.setitem(omniglot_module.URLS, TOPS[0], f"{base}/missing.zip")
    root = tmp_path / "downloaded"
    with pytest.raises(OSError, match="could not download"):
        Omniglot(root, download=True, cache_dir=tmp_path / "c")
    assert not list(root.iterdir())
