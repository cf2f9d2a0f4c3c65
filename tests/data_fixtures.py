"""Fixtures for the data tests: a small synthetic Omniglot, the shared full copy, a local server.

Imported by the ``tests/test_data_*.py`` modules (``from data_fixtures import ...``). The full data
set is decoded once per test session, into a cache folder under pytest's temporary directory.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metagrad.data import Omniglot

SMALL = {
    "images_background": {"Alpha": 3, "Beta": 2},
    "images_evaluation": {"Gamma": 4},
}
"""The synthetic data set: alphabets and their number of characters, per half."""


def drawing(seed: int) -> Image.Image:
    """A 105x105 1-bit drawing in Omniglot's style (white background, black strokes)."""
    rng = np.random.default_rng(seed)
    pixels = np.ones((105, 105), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(5, 80, size=2)
        h, w = rng.integers(4, 25, size=2)
        pixels[r : r + h, c : c + 3] = False
        pixels[r : r + 3, c : c + w] = False
    return Image.fromarray(pixels).convert("1")


def make_omniglot(root: Path, layout: dict = SMALL, zipped: bool = False) -> Path:
    """Write a small Omniglot in the official layout (folders, or the two zips) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    char_id = 1
    for top, alphabets in layout.items():
        for alphabet, n_chars in alphabets.items():
            for k in range(1, n_chars + 1):
                folder = root / top / alphabet / f"character{k:02d}"
                folder.mkdir(parents=True)
                for d in range(1, 21):
                    drawing(1000 * char_id + d).save(folder / f"{char_id:04d}_{d:02d}.png")
                char_id += 1
        if zipped:
            zip_folder(root / top, root / f"{top}.zip")
    return root


def zip_folder(folder: Path, out: Path) -> Path:
    """Zip ``folder`` into ``out`` (entries ``folder.name/...``, as officially); remove it."""
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder.parent).as_posix())
    for path in sorted(folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    folder.rmdir()
    return out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def shared_root() -> Path:
    """The shared full Omniglot (``$METAGRAD_OMNIGLOT``), or skip the test with the reason."""
    value = os.environ.get("METAGRAD_OMNIGLOT")
    if not value:
        pytest.skip("METAGRAD_OMNIGLOT is not set: point it at the shared Omniglot folder")
    root = Path(value)
    if not (root / "images_background.zip").exists() and not (root / "images_background").exists():
        pytest.skip(f"METAGRAD_OMNIGLOT={value} holds no Omniglot (images_background.zip)")
    return root


_FULL: dict[str, object] = {}


@pytest.fixture
def full_omniglot(tmp_path_factory: pytest.TempPathFactory) -> Omniglot:
    """The full data set, decoded once per session into a fresh cache folder."""
    root = shared_root()
    if "ds" not in _FULL:
        cache = tmp_path_factory.mktemp("omniglot-cache")
        _FULL["ds"] = Omniglot(root, cache_dir=cache)
        _FULL["cache"] = cache
    return _FULL["ds"]  # type: ignore[return-value]


@pytest.fixture
def full_omniglot_info(full_omniglot: Omniglot) -> dict[str, object]:
    """``cache``: the folder the session's first load decoded into."""
    return _FULL


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A threaded HTTP server on 127.0.0.1 serving a temporary folder: ``(base_url, folder)``."""
    folder = tmp_path / "served"
    folder.mkdir()

    def handler(*args: object, **kwargs: object) -> _QuietHandler:
        return _QuietHandler(*args, directory=str(folder), **kwargs)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
