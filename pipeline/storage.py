"""Paths that may be local, NFS or object-store URIs (``s3://``, ``gs://``), through pyarrow's filesystems."""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it; plain paths are local."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def write_text(path: str, text: str) -> None:
    """Write a whole file; locally through a temporary file and a rename, so readers never see half of it."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    target = p if is_uri(path) else p + ".tmp"
    with fs.open_output_stream(target) as f:
        f.write(text.encode())
    if target != p:
        os.replace(target, p)


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def move(src: str, dst: str) -> None:
    fs, s = resolve(src)
    _, d = resolve(dst)
    fs.move(s, d)


def list_files(directory: str, suffix: str = "") -> list[str]:
    fs, p = resolve(directory)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    if "://" in directory:
        scheme = directory.split("://", 1)[0]
        return [f"{scheme}://{n}" for n in names]
    return names
