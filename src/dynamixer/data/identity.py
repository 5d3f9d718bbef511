"""The identity of a data set by its content, recorded in every checkpoint and compared at a resume.

A resume must train on the data the run started with, wherever that data lies now: a copy on a node's local
disk is the same data set, a folder with the same file names and sizes but other images is not. A data
module's identity maps names relative to its data set (a split's folder, a shard, a parquet file) to content
digests. Reading every byte of ImageNet at each start would cost an epoch of I/O, so a file's digest covers
its size and its first and last `edge` bytes (the whole file when it is smaller than twice that): for an
image, its header and the end of its coded data; for a shard, its first and last samples with their labels.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

DIGEST = r"^[0-9a-f]{32}$"  # what `file_digest` and `digest_of` give: 16 bytes as hex
IMAGE_EDGE = 4 << 10  # a JPEG's header and its last coded blocks
SHARD_EDGE = 64 << 10  # a tar shard's first and last samples, a parquet file's last row group and footer
WHOLE = 1 << 62  # label files, CIFAR batches: small enough to read whole
_LISTED = 5


def file_digest(path: str | os.PathLike, edge: int) -> str:
    """The content digest of one file: its size and its first and last `edge` bytes (all of it if smaller).
    A file that cannot be read has the digest of no content: the loader meets it as an unreadable image."""
    digest = hashlib.blake2b(digest_size=16)

    def update(f, count: int) -> None:
        while count > 0 and (chunk := f.read(min(count, 1 << 24))):
            digest.update(chunk)
            count -= len(chunk)

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(size.to_bytes(8, "little"))
            if size <= 2 * edge:
                update(f, size)
            else:
                update(f, edge)
                f.seek(size - edge)
                update(f, edge)
    except OSError:
        return hashlib.blake2b(b"unreadable", digest_size=16).hexdigest()
    return digest.hexdigest()


def file_digests(paths: list[str], edge: int, threads: int = 8) -> list[str]:
    """`file_digest` of each path, in order, read by `threads` threads (a network file system answers each
    small read slowly, many at once about as fast)."""
    if len(paths) < 64:
        return [file_digest(p, edge) for p in paths]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: file_digest(p, edge), paths))


def files_identity(files: Mapping[str, str | os.PathLike], edge: int) -> dict[str, str]:
    """Name -> `file_digest` of its file, for the files that make a data set (shards, parquet, batch files)."""
    return dict(zip(files, file_digests([str(p) for p in files.values()], edge)))


def digest_of(parts: Iterable[object]) -> str:
    """One digest of plain values (names, sizes, digests), in order."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def differences(recorded: Mapping[str, str], now: Mapping[str, str]) -> str | None:
    """What differs between a recorded identity and the data's now, a few names of each kind; None if equal."""
    kinds = {
        "changed": sorted(k for k in recorded.keys() & now.keys() if recorded[k] != now[k]),
        "missing": sorted(recorded.keys() - now.keys()),
        "new": sorted(now.keys() - recorded.keys()),
    }
    found = [
        f"{len(names)} {kind} ({', '.join(names[:_LISTED])}{', ...' if len(names) > _LISTED else ''})"
        for kind, names in kinds.items()
        if names
    ]
    return "; ".join(found) or None
