"""Parsers of files and patterns from outside, bounded before anything expands: a file's size before it is read,
YAML without aliases (one "billion laughs" line cannot become gigabytes), a brace pattern's count before it is
expanded, a MATLAB file's compressed parts before they are inflated. Over a bound is one `DataError` naming
the file and the bound; nothing is allocated for it first."""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import yaml

from dynamixer.errors import DataError

MAX_TEXT_BYTES = 16 * 2**20
MAX_YAML_DEPTH = 64
MAX_EXPANSION = 100_000  # shards a pattern names (ImageNet as WebDataset: about a thousand)
MAX_MAT_BYTES = 64 * 2**20  # a MATLAB file, read or inflated (the ILSVRC2012 devkit's meta.mat: under 1 MiB)


def read_text(path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of a file of at most `max_bytes`, checked on the open file before it is read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise DataError(f"{path} is {size} bytes, over the {max_bytes} bytes such a file ever holds: not ours")
        return f.read(max_bytes + 1).decode("utf-8", errors="replace")


class _PlainLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (our files never use them) and with bounded nesting."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"an alias ({self.peek_event().start_mark}): our files hold none")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested over {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str) -> Any:
    """The plain data of YAML text from outside (no aliases, bounded nesting); `yaml.YAMLError` otherwise."""
    return yaml.load(text, Loader=_PlainLoader)  # noqa: S506  (a safe loader)


def load_yaml(path: str | os.PathLike) -> Any:
    """The plain data of a YAML file from outside (`read_text`'s bound, `parse_yaml`)."""
    try:
        return parse_yaml(read_text(path))
    except yaml.YAMLError as err:
        raise DataError(f"cannot read {path}: {str(err).splitlines()[0][:200]}") from None


_RANGE = re.compile(r"\{(-?\d+|[A-Za-z])\.\.(-?\d+|[A-Za-z])(?:\.\.(-?\d+))?\}")
_CAP = 10**12


def pattern_count(pattern: str) -> int:
    """The number of names a brace pattern expands to (an upper bound where braces are escaped or unbalanced),
    counted without expanding it: lists add their alternatives, groups in a row multiply."""

    left_open = []  # a group without its "}": brace expansion reads such a "{" as text

    def sequence(i: int) -> tuple[int, int]:  # a run of text and groups, up to a "," or "}" of the group above
        total = 1
        while i < len(pattern) and pattern[i] not in ",}":
            if pattern[i] == "{":
                count, i = group(i)
                total = min(total * count, _CAP)
            else:
                i += 2 if pattern[i] == "\\" else 1
        return total, i

    def group(i: int) -> tuple[int, int]:  # from a "{" to after its "}"
        close = pattern.find("}", i)
        if close != -1 and (found := _RANGE.fullmatch(pattern, i, close + 1)):
            first, last, step = found.groups()
            if first.lstrip("-").isdigit() and last.lstrip("-").isdigit():
                return abs(int(last) - int(first)) // max(1, abs(int(step or 1))) + 1, close + 1
            return abs(ord(last) - ord(first)) + 1, close + 1
        alternatives, i = 0, i + 1
        while True:
            count, i = sequence(i)
            alternatives = min(alternatives + count, _CAP)
            if i >= len(pattern):
                left_open.append(i)
            if i >= len(pattern) or pattern[i] == "}":
                return alternatives, i + 1
            i += 1  # past ","

    total, i = 1, 0
    while i < len(pattern):
        count, i = sequence(i)
        total, i = min(total * count, _CAP), i + 1  # a "," or "}" outside any group is plain text
    if left_open:  # then a cruder bound: each list at most doubles per comma, ranges multiply
        total = min(2 ** min(pattern.count(","), 64), _CAP)
        for found in _RANGE.finditer(pattern):
            total = min(total * group(found.start())[0], _CAP)
    return total


def expand_braces(pattern: str, source: str) -> list[str]:
    """The names of a brace pattern (`train-{000000..000127}.tar`), refused over `MAX_EXPANSION` before it is
    expanded; `source` names where the pattern came from in the message."""
    from braceexpand import braceexpand

    if len(pattern) > 4096 or pattern_count(pattern) > MAX_EXPANSION:
        raise DataError(
            f"{source}={pattern[:200]!r} names more than {MAX_EXPANSION} shards: give the pattern of the shards there "
            "are, e.g. train-{000000..001023}.tar"
        )
    return list(braceexpand(pattern))


def check_mat_file(path: str | os.PathLike, max_bytes: int = MAX_MAT_BYTES) -> None:
    """A MATLAB 5 file whose size and compressed parts, once inflated, are at most `max_bytes` each (checked
    by inflating them in bounded steps, keeping nothing), before a reader allocates what they declare."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"{path} is {size} bytes, over the {max_bytes} bytes a MATLAB file of ours holds")
    with open(path, "rb") as f:
        header = f.read(128)
        if len(header) < 128:
            return  # too short for MATLAB 5: its reader says why
        order = "<" if header[126:128] == b"IM" else ">"
        while len(tag := f.read(8)) == 8:
            kind, nbytes = struct.unpack(f"{order}II", tag)
            data = f.read(nbytes)
            if kind != 15:  # miCOMPRESSED
                continue
            inflate, inflated, pending = zlib.decompressobj(), 0, data
            while pending:
                try:
                    inflated += len(inflate.decompress(pending, 2**20))
                except zlib.error as err:
                    raise DataError(f"cannot read {path} ({err}): unpack the devkit again") from None
                pending = inflate.unconsumed_tail
                if inflated > max_bytes:
                    raise DataError(
                        f"{path} holds a part that inflates to over {max_bytes} bytes: no devkit file does; "
                        "unpack the devkit again"
                    )
