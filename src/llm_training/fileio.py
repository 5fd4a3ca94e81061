"""Writing files so that nothing the user owns is lost: every writer of the project goes through here.

- A file is written to a fresh temporary beside it (``tempfile``: ``O_EXCL``, unpredictable name, so a
  planted symlink is never followed), flushed, fsynced and renamed over the target; on any error the
  temporary is removed and the old file stays whole.
- A folder is built in a fresh staging folder beside it and swapped in when complete. An existing folder is
  replaced only when everything in it was written by this tool (a marker file lists what it wrote) or the
  caller passed ``overwrite``; a folder that is or holds an input, or the current folder, never.
- A full disk, a quota, a read-only file system or a permission problem becomes one ``StorageError`` line
  naming the path and what to do.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from llm_training.errors import StorageError, UserError
from llm_training.limits import read_json_file

MARKER = ".llm_training.json"  # in every folder this tool builds: who wrote it, and which files
_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_ACCESS = {errno.EACCES, errno.EPERM}
HANDLED = _SPACE | _ACCESS | {errno.EROFS}


def storage_error(exc: OSError, path: str | Path | None = None) -> StorageError:
    """The one line for ``exc``; names the file the error names, else ``path``."""
    where = exc.filename if exc.filename is not None else (path if path is not None else "a file")
    if exc.errno in _SPACE:
        full = "no space left on the device" if exc.errno == errno.ENOSPC else f"{exc.strerror} (disk space)"
        what = f"{full}; free some space or write elsewhere, then run again"
    elif exc.errno in _ACCESS:
        what = "permission denied; fix its permissions (or use another path) and run again"
    elif exc.errno == errno.EROFS:
        what = "read-only file system; write elsewhere"
    else:
        what = exc.strerror or str(exc)
    return StorageError(f"{where}: {what}")


def disk_error(exc: BaseException, path: str | Path | None = None) -> StorageError | None:
    """``storage_error`` for a full disk or a permission error, also one a library reports as its own
    exception (safetensors: "No space left on device (os error 28)"); None for anything else."""
    if isinstance(exc, OSError):
        return storage_error(exc, path) if exc.errno in HANDLED else None
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES):
        if f"os error {code})" in text:
            return storage_error(OSError(code, os.strerror(code)), path)
    return None


def missing_dirs(path: str | Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, deepest first (to remove again after a failure)."""
    missing = []
    for parent in Path(path).absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def remove_empty(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty: a failed write leaves no empty folder."""
    for folder in dirs:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def reporting(path: str | Path | None = None) -> Iterator[None]:
    """Turn a full disk or a permission error inside the block into a ``StorageError`` about ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in HANDLED:
            raise
        raise storage_error(exc, path) from None


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible everywhere; the rename is atomic all the same
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_temp(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new empty file beside ``path`` with an unpredictable name (created with ``O_EXCL``: never a file
    or a symlink that was there before)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; a written file is shared as usual
    finally:
        os.close(fd)
    return Path(name)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh empty temporary file beside ``path`` for a writer that needs a file name (``np.save``,
    ``torch.save``...); when the block ends it is fsynced and renamed to ``path``, on an error removed."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UserError(f"{path}: exists and is not a plain file (a link, a folder, a device); this tool replaces "
                        "only files it wrote: remove it or write elsewhere")  # fmt: skip
    made = missing_dirs(path)
    with reporting(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp(path)
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            remove_empty(made)
            raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """An open temporary file that becomes ``path`` when the block ends without an error."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
        yield handle


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | Path, value: Any, indent: int | None = 2, **dumps: Any) -> Path:
    return write_text(path, json.dumps(value, indent=indent, **dumps) + "\n")


# --------------------------------------------------------------------------------------------- folders


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_file(
    path: str | Path, flag: str, inputs: Iterable[Any] = (), ours: Callable[[Path], bool] | None = None
) -> Path:
    """Refuse an output file that is one of the files or folders the command reads, a link, or (with ``ours``)
    an existing file that ``ours`` does not recognise as this command's output (a file of the user's)."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{flag} {path}: is a symbolic link; name a plain file (the tool never writes through "
                        "or over a link)")  # fmt: skip
    full = path.resolve()
    for item in inputs:
        if (
            isinstance(item, str | os.PathLike)
            and "://" not in str(item)
            and _within(Path(item).resolve(), full)
        ):
            raise UserError(f"{flag} {path}: is the input {item}; write the output to another file")
    if full.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'results.json'}")
    if ours is not None and full.exists() and not ours(full):
        raise UserError(f"{flag} {path}: exists and was not written by this command, which would replace it; "
                        "choose another path, or move it away first")  # fmt: skip
    return full


def json_output(*keys: str, kind: type = dict) -> Callable[[Path], bool]:
    """``ours`` for ``check_output_file``: a JSON file (at most 64 MB) of ``kind`` that, as a dict, has every
    one of ``keys`` (as a list, whose first item does): the shape the command writes."""

    def ours(path: Path) -> bool:
        try:
            value = read_json_file(path)
        except (OSError, ValueError):
            return False
        first = value[0] if isinstance(value, list) and value else value
        return isinstance(value, kind) and isinstance(first, dict) and all(k in first for k in keys)

    return ours


GENERATOR_META = "<meta name='generator' content='llm-training'>"  # in the head of every page the tool writes


def html_output(path: Path) -> bool:
    """``ours`` for HTML reports: a page whose head names this tool as its generator."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return GENERATOR_META.encode() in head


def check_output_dir(
    target: str | Path,
    *,
    names: str = "",
    overwrite: bool = False,
    inputs: Iterable[Any] = (),
    label: str = "output folder",
) -> Path:
    """Refuse, before any work, an output folder whose replacement would lose something the user owns.

    ``names`` is a regular expression of the file names the tool writes there: a folder without the marker
    (made before it existed) counts as the tool's own when it holds a manifest and only such names.
    ``inputs`` are the paths read (non-paths are ignored). Returns ``target`` resolved."""
    target = Path(target)
    full = target.resolve()
    if _within(Path.cwd().resolve(), full):
        raise UserError(f"{label} {target}: is the current folder (or holds it); name a new folder to write")
    for item in inputs:
        if not isinstance(item, str | os.PathLike) or "://" in str(item):
            continue
        source = Path(item).resolve()
        if _within(source, full):
            raise UserError(
                f"{label} {target}: {'is' if source == full else 'holds'} the input {item}; "
                "choose another output folder"
            )
        if source.is_dir() and _within(full, source):
            raise UserError(
                f"{label} {target}: is inside the input folder {item}, whose files are all read: the output "
                "would be read as input the next time; choose a folder outside it"
            )
    if target.is_symlink():  # replacing it would follow it, or lose the user's link
        raise UserError(f"{label} {target}: is a symbolic link; name a folder path that is not a link")
    if not target.exists() or overwrite:
        return full
    if not target.is_dir():
        raise UserError(
            f"{label} {target}: exists and is not a folder; choose another path or pass --overwrite to replace it"
        )
    foreign = foreign_entries(target, names)
    if foreign:
        raise UserError(
            f"{label} {target}: holds files this tool did not write (e.g. {foreign[0]}); "
            "choose a new folder or pass --overwrite to replace it"
        )
    return full


def foreign_entries(folder: Path, names: str = "") -> list[str]:
    """Entries of ``folder`` not written by this tool (sorted); none in an empty folder."""
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return []
    try:
        record = read_json_file(folder / MARKER)
        written = set(record["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):  # no marker: an older folder of this tool, or not ours
        pattern = re.compile(names) if names else None
        manifest = any((folder / m).is_file() for m in ("train.json", "validation.json", "vocab.json"))
        if pattern is None or not manifest:
            return entries
        return [e for e in entries if not pattern.fullmatch(e)]
    return [e for e in entries if e not in written]


def staging_dir(target: str | Path) -> Path:
    """A fresh folder beside ``target`` in which to build it."""
    target = Path(target).resolve()
    with reporting(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs are shared like any folder
    return staging


def replace_dir(staging: Path, target: str | Path, written_by: str) -> None:
    """Mark ``staging`` as this tool's and swap it in; an existing ``target`` is removed only afterwards."""
    target = Path(target).absolute()  # the path itself: a link there is moved away, never followed
    files = sorted(p.name for p in staging.iterdir())
    # a plain write: the staging folder is fresh and private, and the rename below makes it all atomic
    (staging / MARKER).write_text(json.dumps({"written_by": written_by, "files": files}) + "\n")
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / "previous")
        try:
            os.replace(staging, target)
        except BaseException:  # the previous folder goes back where it was
            os.replace(old / "previous", target)
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_dir(target.parent)


@contextmanager
def building_dir(target: str | Path, written_by: str, check: Callable[[], Any]) -> Iterator[Path]:
    """A staging folder that replaces ``target`` when the block ends; removed (and a full disk or a
    permission error reported in one line) on any error. ``check`` (``check_output_dir`` with the command's
    arguments, which the caller also ran before its work) runs again just before the swap: what appeared at
    ``target`` meanwhile is refused too."""
    made = missing_dirs(Path(target).resolve())
    staging = staging_dir(target)
    try:
        with reporting(target):
            yield staging
            check()
            replace_dir(staging, target, written_by)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty(made)
        raise
