"""Where a run's files live: a local folder or a bucket (`gs://bucket/run`), through etils.epath.

Orbax reads and writes checkpoints at either kind of path itself; everything else sdjax writes
(logs, images, JSON, the exported pipeline) goes through these few functions, so that a path is
never turned into a local folder named `gs:` by `os.path`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import fsspec.config
from etils import epath

# Bucket listings are never cached (gcsfs caches them for ever by default): other hosts and
# Orbax add and remove checkpoints, and `latest` must see them. Read when a filesystem is made,
# by etils.epath's as well as ours.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_remote(path) -> bool:
    return "://" in str(path)


def absolute(path) -> str:
    """The path as a string: absolute when local, unchanged when it is a URL."""
    path = str(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(str(base), *parts)


def basename(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def dirname(path) -> str:
    path = str(path).rstrip("/")
    return path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(path)


def exists(path) -> bool:
    return epath.Path(str(path)).exists()


def isdir(path) -> bool:
    return epath.Path(str(path)).is_dir()


def listdir(path) -> list:
    folder = epath.Path(str(path))
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def makedirs(path) -> None:
    epath.Path(str(path)).mkdir(parents=True, exist_ok=True)


def write_bytes(path, data: bytes) -> None:
    """A local file is written under a temporary name and renamed, so no reader sees half of
    it; an object store makes an object visible only once it is whole."""
    if is_remote(path):
        epath.Path(str(path)).write_bytes(data)
        return
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def read_text(path) -> str:
    return epath.Path(str(path)).read_text()


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def _filesystem(path):
    """(fsspec filesystem, path within it) of a URL."""
    import fsspec

    return fsspec.core.url_to_fs(str(path))


def move(source, destination) -> None:
    """Moves a file or folder (on a bucket: each object is copied, then deleted)."""
    source, destination = str(source), str(destination)
    if not is_remote(source) and not is_remote(destination):
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.replace(source, destination)
        return
    if is_remote(source) and is_remote(destination):
        fs, path = _filesystem(source)
        fs.mv(path, _filesystem(destination)[1], recursive=True)
        return
    copy_tree(source, destination)
    if is_remote(source):
        fs, path = _filesystem(source)
        fs.rm(path, recursive=True)
    else:
        shutil.rmtree(source)


def remove_tree(path) -> None:
    """Deletes a folder and everything in it (local or on a bucket)."""
    if is_remote(path):
        fs, inner = _filesystem(path)
        fs.rm(inner, recursive=True)
    else:
        shutil.rmtree(str(path))


def copy_tree(source, destination) -> None:
    """Copies a file or folder between any two places (local, bucket)."""
    source, destination = str(source).rstrip("/"), str(destination).rstrip("/")
    if not is_remote(source) and not is_remote(destination):
        if os.path.isdir(source):
            shutil.copytree(source, destination, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
            shutil.copy2(source, destination)
        return
    if is_remote(source) and is_remote(destination):
        fs, path = _filesystem(source)
        fs.copy(path, _filesystem(destination)[1], recursive=True)
        return
    if is_remote(destination):
        fs, path = _filesystem(destination)
        if os.path.isdir(source):
            for folder, _, files in os.walk(source):
                below = os.path.relpath(folder, source)
                for name in files:
                    target = path if below == "." else f"{path}/{below.replace(os.sep, '/')}"
                    fs.put_file(os.path.join(folder, name), f"{target}/{name}")
        else:
            fs.put_file(source, path)
        return
    fs, path = _filesystem(source)
    if fs.isdir(path):
        for remote in fs.find(path):
            local = os.path.join(destination, *remote[len(path):].strip("/").split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(remote, local)
    else:
        os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
        fs.get_file(path, destination)


@contextlib.contextmanager
def local_copy(path, skip: tuple = ()) -> Iterator[str]:
    """A local folder holding `path`'s files (less the top-level entries in `skip`): `path`
    itself when it is local, else a temporary download."""
    if not is_remote(path):
        yield str(path)
        return
    staging = tempfile.mkdtemp(prefix="sdjax-download-")
    try:
        for name in listdir(path):
            if name not in skip:
                copy_tree(join(path, name), os.path.join(staging, name))
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def local_folder(destination) -> Iterator[str]:
    """A local folder to write `destination`'s files into: `destination` itself when it is
    local; otherwise a temporary folder that is uploaded when the block ends without error."""
    if not is_remote(destination):
        os.makedirs(str(destination), exist_ok=True)
        yield str(destination)
        return
    staging = tempfile.mkdtemp(prefix="sdjax-upload-")
    try:
        yield staging
        copy_tree(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
