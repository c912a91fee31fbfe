"""Paths that may be local, NFS or object-store URIs (``s3://``, ``gs://``), through pyarrow's filesystems.

An object-store URI may carry pyarrow's options as a query string, e.g. a MinIO or other
S3-compatible endpoint: ``s3://bucket/runs?endpoint_override=minio.internal:9000&scheme=http``.
Credentials come from the environment or the instance role, never from the URI (it is logged).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?")
    return base, sep + query


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it; plain paths are local."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def abspath(path: str) -> str:
    """An absolute local path, or the URI unchanged."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path parts; on a URI they go before its query string."""
    if "://" in base:
        root, query = _split_query(base)
        return posixpath.join(root, *parts) + query
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    """The folder holding ``path``; on a URI its query string stays with it."""
    if "://" in path:
        root, query = _split_query(path)
        return posixpath.dirname(root) + query
    return os.path.dirname(path)


def _type(path: str) -> pafs.FileType:
    fs, p = resolve(path)
    return fs.get_file_info(p).type


def exists(path: str) -> bool:
    return _type(path) != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    return _type(path) == pafs.FileType.File


def is_dir(path: str) -> bool:
    return _type(path) == pafs.FileType.Directory


def size(path: str) -> int:
    fs, p = resolve(path)
    return fs.get_file_info(p).size or 0


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file; locally through a temporary file and a rename, so readers never see half of it
    (an object store's PUT is atomic by itself)."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    target = p if is_uri(path) else f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(target) as f:
        f.write(data)
    if target != p:
        os.replace(target, p)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def append_text(path: str, text: str) -> None:
    """Append to a file; object stores cannot append, so there the whole object is rewritten (small files only)."""
    if not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        return
    write_text(path, (read_text(path) if is_file(path) else "") + text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def delete_file(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def list_files(directory: str, suffix: str = "") -> list[str]:
    """Every file under ``directory`` (recursively), as paths or URIs that :func:`resolve` accepts."""
    fs, p = resolve(directory)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [uri_for(directory, n) for n in names]


def uri_for(base: str, fs_path: str) -> str:
    """The path or URI of ``fs_path``, a path inside the filesystem of ``base`` (same scheme and options)."""
    if not is_uri(base):
        return fs_path
    return f"{base.split('://', 1)[0]}://{fs_path}{_split_query(base)[1]}"


def ray_storage(path: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: a local path as is; for a URI,
    the path inside its filesystem and the filesystem itself, so that options in the URI's query
    (a custom endpoint) reach Ray too."""
    if not is_uri(path):
        return abspath(path), None
    fs, p = resolve(path)
    return p, fs


def publish_dir(local_src: str, dst: str, last: str | None = None) -> None:
    """Replace the directory ``dst`` by a copy of the local directory ``local_src``.

    Locally the copy is made aside and renamed into place. An object store has no rename: the old
    objects are deleted and the new ones uploaded, the file named ``last`` after all others, so a
    reader that checks for ``last`` never sees a half-uploaded directory as complete.
    """
    if not is_uri(dst):
        tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.rename(tmp, dst)
        return
    fs, p = resolve(dst)
    delete_dir(dst)
    fs.create_dir(p, recursive=True)
    names = sorted(os.listdir(local_src), key=lambda n: n == last)
    for name in names:
        src = os.path.join(local_src, name)
        if os.path.isdir(src):
            pafs.copy_files(src, f"{p}/{name}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            with open(src, "rb") as f:
                write_bytes(join(dst, name), f.read())


@contextmanager
def build_lock(path: str, on_wait=None) -> Iterator[None]:
    """One build at a time per local lock file (``flock``: released by the kernel when the holder
    dies, so a killed run never leaves it stuck); a second run calls ``on_wait(path)`` and waits."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait(path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_lock_path(output_dir: str, name: str) -> str | None:
    """``<output_dir>/.locks/<name>.lock``, or None for an object store (no lock to take there).

    Outside the folders whose entries are outputs: a lock file is never deleted (a waiter holds the
    same inode), so it must not look like a leftover."""
    return None if is_uri(output_dir) else os.path.join(abspath(output_dir), ".locks", f"{name}.lock")


@contextmanager
def turn_lock(path: str | None, on_wait=None, on_unavailable=None) -> Iterator[None]:
    """:func:`build_lock` where one can be taken, for a lock that only keeps two runs from doing the
    same work at once. ``path`` None (an object store) runs unlocked, silently. Where the lock
    cannot be taken (a filesystem without ``flock``, such as NFS without lockd; a directory this
    process cannot write) it calls ``on_unavailable(reason)`` and goes on unlocked: such a lock
    must never stop a run by itself."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        if path is not None:
            try:
                stack.enter_context(build_lock(path, on_wait))
            except OSError as exc:
                if on_unavailable:
                    on_unavailable(f"{type(exc).__name__}: {exc}")
        yield


@contextmanager
def local_dir(path: str) -> Iterator[str]:
    """A local directory with the contents of ``path``: the path itself, or a temporary download of a URI."""
    if not is_uri(path):
        yield os.path.abspath(os.path.expanduser(path))
        return
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path} does not exist")
    tmp = tempfile.mkdtemp(prefix="flower-distill-")
    try:
        pafs.copy_files(p, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_dir(path: str) -> Iterator[str]:
    """A local directory whose files end up under ``path``: the directory itself when local, else a
    temporary one uploaded (file by file, overwriting) when the block ends without error."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="flower-distill-")
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                src = os.path.join(root, name)
                with open(src, "rb") as f:
                    write_bytes(join(path, *os.path.relpath(src, tmp).split(os.sep)), f.read())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
