"""A folder as a tar stream, generated block by block: a multi-gigabyte model never sits in memory or on disk
twice (the response starts at once and its memory stays at one chunk)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE


def tar_stream(folder: Path, arcname: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Yield a POSIX (pax) tar of the regular files under `folder`, each stored under `arcname/`."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        stat = path.stat()
        info = tarfile.TarInfo(f"{arcname}/{path.relative_to(folder).as_posix()}")
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as f:
            while data := f.read(chunk):
                yield data
        if pad := (-stat.st_size) % BLOCK:
            yield b"\0" * pad
    yield b"\0" * (2 * BLOCK)
