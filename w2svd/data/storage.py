"""Object-store URIs: a local path or ``s3://bucket/key``, behind one pyarrow filesystem.

The S3 endpoint and credentials come from ``StorageOptions`` (explicit), else the usual AWS
environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Options are resolved
once on the driver and shipped to workers, because a worker process may not share the driver's
environment (a Ray cluster started before the variables were set).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

# What a bucket mirror recorded of each object (size, mtime), to notice a rewritten object.
LISTING_FILE = ".listing.json"


@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url: str | None = None) -> StorageOptions:
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path inside it (``bucket/key`` for S3)."""
    if is_s3(uri):
        opts = options or StorageOptions.from_env()
        kwargs: dict = {}
        if opts.endpoint_url:
            scheme, _, host = opts.endpoint_url.partition("://")
            kwargs["endpoint_override"] = host or scheme
            kwargs["scheme"] = scheme if host else "https"
        if opts.access_key:
            kwargs.update(access_key=opts.access_key, secret_key=opts.secret_key)
        kwargs["region"] = opts.region or "us-east-1"
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def relative(uri: str, root: str) -> str:
    """``uri`` relative to ``root`` (both in the same scheme)."""
    root = root.rstrip("/") + "/"
    if not uri.startswith(root):
        raise ValueError(f"{uri!r} is not under {root!r}")
    return uri[len(root):]


def to_uri(root_uri: str, fs_path: str) -> str:
    """A filesystem path (as listed by ``filesystem(root_uri)``) back to a URI."""
    return f"s3://{fs_path}" if is_s3(root_uri) else fs_path


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object. Locally via a temp file + rename, so readers never see half a
    file; an S3 PUT is already all-or-nothing."""
    fs, path = filesystem(uri, options)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int


def list_files(uri: str, options: StorageOptions | None = None) -> list[FileEntry]:
    """Every file under ``uri`` (recursive), sorted by URI; an absent prefix lists nothing."""
    fs, path = filesystem(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [FileEntry(to_uri(uri, path), info.size)]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [FileEntry(to_uri(uri, i.path), i.size) for i in infos if i.type == pafs.FileType.File]
    return sorted(files, key=lambda e: e.uri)


def cache_dir(*parts: str) -> Path:
    """The project's local cache: ``$W2SVD_CACHE_DIR`` (default ``~/.cache/w2svd``), then ``parts``.
    Bucket copies of model folders, trained metric encoders and downloads all live under it."""
    root = Path(os.environ.get("W2SVD_CACHE_DIR") or Path.home() / ".cache" / "w2svd").expanduser()
    return root.joinpath(*parts)


def copy_to_local(uri: str, cache_root: str | Path | None = None, options: StorageOptions | None = None,
                  include: Callable[[str], bool] | None = None) -> Path:
    """A local folder holding ``uri``'s files: ``uri`` itself when local, else a mirror at
    ``<cache_root>/s3/<bucket>/<prefix>`` (``cache_root`` defaults to ``cache_dir()``).

    The bucket is listed on every call and a file is fetched again when its size or
    modification time differs from what the mirror recorded, so a model folder downloads once
    and a rewritten object is noticed. ``include(relative_path)`` limits what is copied (a
    config-only copy for building a model on the meta device). Each file lands through a
    temporary name, so an interrupted copy is never taken for a whole one.
    """
    if not is_s3(uri):
        local = Path(filesystem(uri)[1])
        if not local.exists():
            raise FileNotFoundError(f"{uri} does not exist")
        return local
    target = Path(cache_root or cache_dir()) / "s3" / uri[len("s3://"):].rstrip("/")
    fs, root = filesystem(uri, options)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} holds no files")
    remote = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    wanted = [(i, i.path[len(root):].lstrip("/")) for i in remote]
    wanted = [(i, rel) for i, rel in wanted if include is None or include(rel)]
    if not wanted:
        raise FileNotFoundError(f"{uri} holds no files" + (" that are wanted here" if remote else ""))
    listing_file = target / LISTING_FILE
    seen = json.loads(listing_file.read_text()) if listing_file.is_file() else {}
    for entry, rel in wanted:
        stamp = [entry.size, entry.mtime_ns]
        dest = target / rel
        if dest.is_file() and seen.get(rel) == stamp:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        with fs.open_input_stream(entry.path) as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 22)
        partial.replace(dest)
        seen[rel] = stamp
        listing_file.write_text(json.dumps(seen))
    return target


def read_json(uri: str, options: StorageOptions | None = None) -> dict | None:
    """The JSON object at ``uri``, or None when there is none."""
    return json.loads(read_bytes(uri, options)) if exists(uri, options) else None


def write_json(uri: str, value: dict, options: StorageOptions | None = None) -> None:
    write_bytes(uri, json.dumps(value, indent=2).encode(), options)


def upload_folder(local: Path, uri: str, options: StorageOptions | None = None) -> None:
    """Every file under the local folder ``local`` to the same relative path under ``uri``."""
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        write_bytes(join(uri, path.relative_to(local).as_posix()), path.read_bytes(), options)
