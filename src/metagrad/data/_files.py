"""Files: download with a checksum, safe extraction, moving bad files aside, atomic writes.

Every write here is atomic (a temporary file or folder, then ``os.replace``), so an interrupted
download, extraction or cache write never looks complete. A file that metagrad wrote (a download,
marked by a hidden ``.<name>.downloaded`` beside it, or a file in the cache folder) that fails a
check is renamed ``<name>.corrupt`` (or ``.corrupt.1``, ...) and never used again nor silently
replaced; a file the user supplied is reported and left where it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, cast

import numpy as np
from tqdm import tqdm  # type: ignore[import-untyped]


def default_cache_dir() -> Path:
    """``$METAGRAD_CACHE``, else ``$XDG_CACHE_HOME/metagrad``, else ``~/.cache/metagrad``."""
    if os.environ.get("METAGRAD_CACHE"):
        return Path(os.environ["METAGRAD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "metagrad"


def _marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.downloaded")


def is_metagrads(path: Path) -> bool:
    """Whether metagrad wrote ``path``: a download (``.part``, or marked) or a cache file."""
    if path.name.endswith(".part") or _marker(path).is_file():
        return True
    try:
        return path.resolve().is_relative_to(default_cache_dir().resolve())
    except OSError:
        return False


def move_aside(path: Path, name: str | None = None) -> str:
    """Rename a bad file that metagrad wrote to ``<name>.corrupt`` (numbered if taken); say where
    it went. A file the user supplied (:func:`is_metagrads` false) is never moved.

    ``name`` defaults to the file's own name. Returns a phrase for an error message; never raises
    (a file that cannot be moved, in a read-only folder say, is reported, not fatal).
    """
    if not is_metagrads(path):
        return f"it is left in place at {path} (a file you supplied is never moved); replace it"
    _marker(path).unlink(missing_ok=True)
    base = name or path.name
    target = path.with_name(base + ".corrupt")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{base}.corrupt.{n}")
    try:
        os.replace(path, target)
    except OSError as err:
        return f"it could not be moved aside ({err}); delete or replace it by hand"
    return f"it was moved aside to {target}"


def check_member(name: str) -> PurePosixPath:
    """A zip entry's relative path; ``ValueError`` if it is absolute or climbs with ``..``."""
    posix = name.replace("\\", "/")
    path = PurePosixPath(posix)
    absolute = posix.startswith("/") or (len(posix) > 1 and posix[1] == ":")
    if absolute or ".." in path.parts:
        raise ValueError(
            f"unsafe zip entry {name!r}: absolute paths and '..' are refused; "
            "use the official zip, whose entries all sit under one top folder"
        )
    return path


def safe_extract(zip_path: Path, dest: Path, top: str) -> Path:
    """Extract ``zip_path`` (entries all under ``top/``) to ``dest/top``; return that folder.

    Every entry is checked first (:func:`check_member`); files are written into a temporary folder
    beside the target, which is renamed into place only when complete.
    """
    with zipfile.ZipFile(zip_path) as archive:
        infos = archive.infolist()
        for info in infos:
            parts = check_member(info.filename).parts
            if not parts or parts[0] != top:
                raise ValueError(
                    f"{zip_path}: entry {info.filename!r} is outside the top folder {top}/; "
                    "use the official zip"
                )
        tmp = Path(tempfile.mkdtemp(prefix=f".{top}-extract-", dir=dest))
        try:
            for info in infos:
                target = tmp.joinpath(*check_member(info.filename).parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            os.replace(tmp / top, dest / top)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / top


def download(url: str, dest: Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest``, checking its md5; atomic (``dest.part``, then rename).

    On a checksum mismatch the download is moved aside (``dest.corrupt``) and ``ValueError`` is
    raised; on a network error ``OSError`` is raised and nothing is left behind.
    """
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr)
            with bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        raise OSError(
            f"could not download {url}: {err}; check the connection, or fetch the file by hand "
            f"into {dest.parent}"
        ) from err
    if digest.hexdigest() != md5:
        where = move_aside(part, dest.name)
        raise ValueError(
            f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}; {where} "
            "and was not used. Retry the download, or fetch the file by hand"
        )
    os.replace(part, dest)
    _marker(dest).write_text(f"{url} md5 {md5}\n")  # metagrad's own: moved aside if it goes bad
    return dest


def write_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **cast(dict[str, Any], arrays))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """Every array of an ``.npz`` (``allow_pickle=False``), or ``None`` if missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
