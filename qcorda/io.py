"""Atomic output directories and files.

Every command writes into a temporary directory beside the target and renames it
into place only when complete, so a failure (disk full, Ctrl-C, a bug) never leaves
a partial artifact under the target name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


class OutputExistsError(FileExistsError):
    pass


def check_out_dir(out: str | os.PathLike, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse an existing output directory unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{flag} {out} already exists; choose another path or pass --overwrite to replace it"
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{flag} {out} exists and is not a directory; remove it or choose another path")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; move it to ``out`` on success.

    On any exception the temporary directory is removed and ``out`` is untouched.
    """
    out = check_out_dir(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any mkdir
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_atomic(path: str | os.PathLike, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` for a temporary name beside ``path``, then rename it into place:
    a reader (or a resumed run) sees either the whole file or none, whatever fails in between."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` through :func:`replace_atomic`."""
    return replace_atomic(path, lambda tmp: tmp.write_text(text))


def check_inside(path: str | os.PathLike, root: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` resolved, refused unless it lies under ``root`` (no ``..`` or symlink escapes)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p != r and r not in p.parents:
        raise OutputExistsError(f"{flag}: refusing to write {path} outside {root}")
    return p
