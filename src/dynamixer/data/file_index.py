"""The file listing of a folder data set, made once per run and read by every rank and every restart.

Listing ImageNet's 1.28M files takes minutes on a network file system, and every rank of every restart
did it again. A `FileIndex` records each folder walked under a split (its modification time, its
subfolders, its image files with their sizes and content digests) with a digest of the whole. It is
written once (rank 0 of the first start) and read back afterwards: a restart only stats the folders
(about 2,000 for ImageNet), lists again only those whose time changed (a copy of the data to a node's
local disk: all of them, once), and lets the caller refuse, naming the folder, a listing that differs
from the one the run started with. The content digests make the data set's identity
(`dynamixer.data.identity`), which a resume compares.

The index file is read as plain data: gzip-compressed JSON, its size bounded, every name checked to stay
inside the split's folder.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from dynamixer.data.identity import DIGEST, IMAGE_EDGE, digest_of, file_digests
from dynamixer.errors import DataError
from dynamixer.machinery.files import write_atomic

INDEX_FORMAT = 2
_MAX_BYTES = 256 << 20  # the decompressed index of ImageNet is ~60 MB; more is not an index of ours
_LISTED = 5  # differing folders named in a message

Folder = dict[str, Any]  # {"mtime_ns": int, "dirs": [name, ...], "files": [[name, size, digest], ...]}


def _list_folder(path: str) -> Folder:
    """One folder's entry: its time, subfolders (following symlinks) and image files with their sizes and
    content digests, sorted."""
    dirs, files = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir():
                if not entry.name.startswith("."):  # .ipynb_checkpoints, .cache, ...: not the data set's
                    dirs.append(entry.name)
            elif has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                files.append([entry.name, entry.stat().st_size])
    files.sort()
    digests = file_digests([os.path.join(path, name) for name, _ in files], IMAGE_EDGE)
    files = [[name, size, digest] for (name, size), digest in zip(files, digests)]
    return {"mtime_ns": os.stat(path).st_mtime_ns, "dirs": sorted(dirs), "files": files}


def scan(root: str | os.PathLike) -> dict[str, Folder]:
    """Every folder under `root` (relative path, `""` for `root`) -> its entry, in walk order (top-down,
    sorted). Each real folder is read once, so a symlink loop neither recurses forever nor lists twice."""
    folders: dict[str, Folder] = {}
    visited: set[str] = set()

    def walk(rel: str) -> None:
        path = os.path.join(root, rel)
        real = os.path.realpath(path)
        if real in visited:
            return
        visited.add(real)
        folders[rel] = entry = _list_folder(path)
        for name in entry["dirs"]:
            walk(os.path.join(rel, name) if rel else name)

    walk("")
    return folders


def images_under(folders: dict[str, Folder], rel: str) -> Iterator[str]:
    """The image files under folder `rel` of a scan (relative paths), in the order of a sorted top-down walk."""
    entry = folders.get(rel)
    if entry is None:  # a folder the walk skipped: a second link to one already listed
        return
    prefix = f"{rel}/" if rel else ""
    yield from (prefix + name for name, *_ in entry["files"])
    for name in entry["dirs"]:
        yield from images_under(folders, prefix + name)


def _named(split: str, rel: str) -> str:
    return f"{split}/{rel}" if rel else split


def _digest(splits: dict[str, dict[str, Folder]]) -> str:
    content = {s: {rel: [f["dirs"], f["files"]] for rel, f in folders.items()} for s, folders in splits.items()}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


_NOT_NAMES = {"", ".", ".."}


def _plain_names(names: list[Any], distinct: bool = True) -> bool:
    """True if `names` are (`distinct`) file or folder names: strings, not empty, `.` or `..`, with no `/`."""
    try:
        joined = "\0".join(names)  # one pass in C: a TypeError for anything that is not a string
    except TypeError:
        return False
    if not names:
        return True
    unique = set(names)  # a name listed twice would be a sample twice
    plain = "/" not in joined and joined.count("\0") == len(names) - 1 and not _NOT_NAMES & unique
    return plain and (len(unique) == len(names) or not distinct)


def _check_folder(rel: Any, entry: Any) -> bool:
    if not isinstance(rel, str) or not (rel == "" or _plain_names(rel.split("/"), distinct=False)):
        return False
    if not isinstance(entry, dict) or type(entry.get("mtime_ns")) is not int:
        return False
    dirs, files = entry.get("dirs"), entry.get("files")
    if not isinstance(dirs, list) or not isinstance(files, list) or not _plain_names(dirs):
        return False
    if not all(type(f) is list and len(f) == 3 and type(f[1]) is int and _is_digest(f[2]) for f in files):
        return False
    return _plain_names([f[0] for f in files])


def _is_digest(value: Any) -> bool:
    return type(value) is str and re.fullmatch(DIGEST, value) is not None


class FileIndex:
    """The listing of each split folder of a data set (`splits`: split -> `scan` of its folder)."""

    def __init__(self, splits: dict[str, dict[str, Folder]]) -> None:
        self.splits = splits

    @classmethod
    def build(cls, roots: dict[str, Path]) -> FileIndex:
        return cls({split: scan(root) for split, root in roots.items()})

    def counts(self) -> dict[str, tuple[int, int]]:
        """Split -> (image files, their bytes)."""
        return {
            split: (
                sum(len(f["files"]) for f in folders.values()),
                sum(s for f in folders.values() for _, s, _ in f["files"]),
            )
            for split, folders in self.splits.items()
        }

    def write(self, path: Path) -> None:
        payload = {
            "format": INDEX_FORMAT,
            "digest": _digest(self.splits),
            "counts": self.counts(),
            "splits": self.splits,
        }

        def write(file: BinaryIO) -> None:  # streamed: an index of a million files is not held twice
            with gzip.GzipFile(fileobj=file, mode="wb", compresslevel=1) as packed:
                with io.TextIOWrapper(packed, encoding="utf-8") as text:
                    json.dump(payload, text, separators=(",", ":"))

        write_atomic(path, write)  # readers see the old index or the new one, never half of one

    @classmethod
    def read(cls, path: Path) -> FileIndex:
        """The index at `path`, checked to be one of ours and whole; `DataError` (naming it) otherwise."""
        damaged = DataError(
            f"{path} is not a whole data-set index of this project. Delete it: the run then lists its data again "
            "(and trains on what it finds)"
        )
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read(_MAX_BYTES + 1)
            payload = json.loads(raw) if len(raw) <= _MAX_BYTES else None
        except (OSError, EOFError, ValueError, RecursionError, zlib.error):
            raise damaged from None
        splits = payload.get("splits") if isinstance(payload, dict) else None
        if (
            not isinstance(payload, dict)
            or payload.get("format") != INDEX_FORMAT
            or not isinstance(splits, dict)
            or not all(isinstance(f, dict) and all(_check_folder(r, e) for r, e in f.items()) for f in splits.values())
            or payload.get("digest") != _digest(splits)
        ):
            raise damaged
        return cls(splits)

    def identity(self) -> dict[str, str]:
        """Each listed folder (`split/relative path`) -> a digest of its subfolders and files with their
        content digests: the data set's identity (`dynamixer.data.identity`)."""
        return {
            _named(split, rel): digest_of([*entry["dirs"], *map(tuple, entry["files"])])
            for split, folders in self.splits.items()
            for rel, entry in folders.items()
        }

    def refresh(self, roots: dict[str, Path]) -> tuple[bool, list[str]]:
        """Check the index against the folders: each folder whose time changed is listed again and must hold
        the same subfolders and files (name, size and content digest); its new time is kept. Returns whether
        any time changed (the index should be written again) and the folders that differ, each with what it held
        and holds."""
        changed, differ = False, []
        for split, folders in self.splits.items():
            for rel, entry in folders.items():
                path = roots[split] / rel
                try:
                    if os.stat(path).st_mtime_ns == entry["mtime_ns"]:
                        continue
                    now = _list_folder(str(path))
                except OSError:
                    differ.append(f"{_named(split, rel)}: missing")
                    continue
                if now["dirs"] != entry["dirs"] or now["files"] != entry["files"]:
                    counts = [(len(e["files"]), len(e["dirs"])) for e in (entry, now)]
                    differ.append(
                        f"{_named(split, rel)}: {counts[0][0]} images and {counts[0][1]} folders then, "
                        f"{counts[1][0]} and {counts[1][1]} now"
                        if counts[0] != counts[1]
                        else f"{_named(split, rel)}: other images under the same names"
                    )
                entry["mtime_ns"], changed = now["mtime_ns"], True
        return changed, differ


def describe_differences(roots: dict[str, Path], differ: list[str]) -> str:
    """The folders that differ, a few of them by name, for a message."""
    listed = "".join(f"\n  {d}" for d in differ[:_LISTED])
    more = f"\n  ... and {len(differ) - _LISTED} more" if len(differ) > _LISTED else ""
    return f"under {', '.join(str(r) for r in roots.values())}, {len(differ)} folder(s) differ:{listed}{more}"
