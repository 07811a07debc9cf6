"""Writing a run's files so that a kill or a full disk never leaves half a file, and checking where they go.

Every file is written to a temporary name beside its target and renamed over it
(os.replace is atomic within a filesystem); a failed write becomes WriteError, one
sentence naming the file and the reason.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from lnfree.config import UserError, WriteError


def why_not_written(err: BaseException, path: Path) -> str:
    """The reason for a failed write, in words: the OS error, else the free space left (torch and
    safetensors report a full disk as a RuntimeError without an errno)."""
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno)
    try:
        free = shutil.disk_usage(existing_ancestor(path)).free
    except OSError:
        return type(err).__name__
    return f"{type(err).__name__}, with {free / 2**20:.0f} MiB free on that disk"


# What writing a file can raise: the OS, torch.save (RuntimeError) and safetensors (SafetensorError).
def _write_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


@contextmanager
def writing(path: Path, what: str | None = None):
    """Turn a failed write of `path` into one WriteError sentence."""
    try:
        yield
    except _write_errors() as err:
        raise WriteError(f"could not write {what or path} ({why_not_written(err, Path(path))})") from None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(), unlike mkstemp, honours the umask
    with writing(path):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def append_line(path: Path, line: str) -> None:
    """Append one line (metrics.jsonl); a kill mid-write leaves a partial last line, which readers skip."""
    with writing(path), open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def remove_tree(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves it half-deleted under its own name."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)  # a previous kill's leftovers
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def existing_ancestor(path: Path) -> Path:
    """`path` itself or the nearest ancestor that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path, flag: str) -> None:
    """Refuse, before anything heavy, an output directory that is a file, lies under one, or cannot be
    written (checked by creating and removing a temporary file)."""
    path = Path(path)
    where = existing_ancestor(path)
    if not where.is_dir():
        what = f"{flag} {path} is a file" if where == path.absolute() else f"{flag} {path} lies under {where}, a file"
        raise UserError(f"{what}; give a directory.")
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {where} ({why_not_written(err, where)}); choose "
                        f"another place.") from None


def check_output_file(path: Path, flag: str) -> None:
    """Refuse an output file that is a directory or whose folder cannot be written, before the work."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name.")
    check_writable_dir(path.parent, f"{flag}'s folder")


def file_kind(mode: int) -> str:
    """A stat mode in words, for refusing what is not a regular file or a folder."""
    kinds: list[tuple[Callable[[int], bool], str]] = [
        (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")
