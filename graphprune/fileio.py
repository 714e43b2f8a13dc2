"""Atomic output: every file and folder graphprune writes appears whole or not at all.

A write goes to a temporary name in the target's own folder (the same file system, so the
final ``os.replace`` is atomic), is flushed to disk (``fsync``) and only then renamed into
place. On any exception, KeyboardInterrupt included, the temporary is removed, and so are
the folders created for it, if they stayed empty. A reader never sees a half-written file,
and an existing output survives a failed overwrite.

* :func:`atomic_path` -- a temporary path for one file, for writers that take a path
  (safetensors, matplotlib); :func:`write_bytes`, :func:`write_text` and :func:`write_json`
  are built on it.
* :func:`atomic_dir` / :class:`StagedDir` -- a whole folder (a model folder), staged under a
  temporary name and renamed into place; an existing one is replaced only with ``overwrite``.
* :func:`staging_dir` + :func:`publish` -- several files built together (an ONNX model and
  its external data) and moved next to the target, all or none.

Failures that mean "this output cannot be written here" -- no space, no permission, a
read-only file system -- become one :class:`~graphprune.errors.OutputError` naming the final
path (never a temporary one), the system's reason and a fix, which the CLI prints as one
line. Writers in native code report them as their own exception types (safetensors:
``SafetensorError("... (os error 28)")``); those are recognised by the errno in the message.

This module is at the bottom of the layering: it imports the standard library and
:mod:`graphprune.errors` only.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from graphprune.errors import GraphPruneError, OutputError

StrPath = str | os.PathLike[str]

#: errno -> how to fix it; ``{option}`` is the setting that chose the path (``--out``...).
FIXES: dict[int, str] = {
    errno.ENOSPC: "free space or choose another {option}",
    errno.EFBIG: "the file system or a file size limit (ulimit -f) does not allow a file this large; choose another {option}",
    errno.EACCES: "check the folder's permissions or choose another {option}",
    errno.EPERM: "check the folder's permissions or choose another {option}",
    errno.EROFS: "choose another {option} on a writable file system",
    errno.EIO: "check the disk or choose another {option}",
    errno.ENAMETOOLONG: "choose a shorter {option}",
    errno.ENOTDIR: "a file is where a folder should be; choose another {option}",
    errno.EISDIR: "a folder is where a file should be; choose another {option}",
}
if hasattr(errno, "EDQUOT"):  # not on every platform
    FIXES[errno.EDQUOT] = "free space within your quota or choose another {option}"
#: errno values only a write raises: an error with one of these is a write failure wherever it comes
#: from (EACCES, EIO... may come from reading an input too)
WRITE_ERRNOS = frozenset(FIXES) & {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}

_NATIVE_ERRNO = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error shows an errno


def os_errno(exc: BaseException) -> int | None:
    """The errno behind ``exc``: an ``OSError``'s, or the ``(os error N)`` a native writer put in its message."""
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, Exception) and not isinstance(exc, GraphPruneError):
        match = _NATIVE_ERRNO.search(str(exc))
        if match:
            return int(match.group(1))
    return None


def _shown(filename: Any, renames: Sequence[tuple[Path, Path]]) -> Path | None:
    """``filename`` as the user should see it: a temporary (or a file inside one) under its final name."""
    if not isinstance(filename, (str, bytes, os.PathLike)):
        return None
    name = os.path.abspath(os.fsdecode(filename))
    for temp, final in renames:
        base = os.path.abspath(temp)
        if name == base:
            return final
        if name.startswith(base + os.sep):
            return final / os.path.relpath(name, base)
    return Path(os.fsdecode(filename))


def output_error(
    exc: BaseException,
    path: StrPath | None = None,
    *,
    option: str = "--out",
    renames: Sequence[tuple[Path, Path]] = (),
) -> OutputError | None:
    """The :class:`OutputError` for ``exc`` if it means an output cannot be written, else None.

    Args:
        exc: what a write raised.
        path: the output named when ``exc`` carries no file name (native writers).
        option: the setting that chose the path, named in the fix.
        renames: ``(temporary, final)`` pairs: a file name inside a temporary is shown under
            its final name, so messages never mention temporaries.
    """
    code = os_errno(exc)
    if code not in FIXES:
        return None
    shown = _shown(getattr(exc, "filename", None), renames) or (Path(path) if path is not None else None)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else os.strerror(code)
    detail = f"{reason}; {FIXES[code].format(option=option)}."
    if shown is None:
        return OutputError(f"cannot write the output: {detail}")
    return OutputError(f"cannot write {shown}: {detail}", path=shown, detail=detail)



def cache_root() -> Path:
    """graphprune's cache: ``$XDG_CACHE_HOME`` (or ``~/.cache``)/graphprune (built kernels, converted models)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphprune"

@contextmanager
def output_errors(path: StrPath, *, option: str = "--out", renames: Sequence[tuple[Path, Path]] = ()) -> Iterator[None]:
    """Raise write failures inside the block as :class:`OutputError` (see :func:`output_error`); others pass.

    ``renames`` is read when a failure happens, so a caller may append to a list it passed.
    """
    try:
        yield
    except OutputError as err:  # from a write nested in a temporary (a report inside a staged folder)
        shown = _shown(err.path, renames) if err.path is not None and err.detail is not None else None
        if shown is None or shown == Path(err.path):  # type: ignore[arg-type]
            raise
        raise OutputError(f"cannot write {shown}: {err.detail}", path=shown, detail=err.detail) from err.__cause__
    except GraphPruneError:
        raise
    except Exception as exc:  # OSError, and native writers' own exception types
        failure = output_error(exc, path, option=option, renames=renames)
        if failure is None:
            raise
        raise failure from exc


# ---------------------------------------------------------------------------- low level
def make_dirs(folder: StrPath, *, option: str = "--out") -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first.

    A failed write hands the list to :func:`remove_dirs`, so it leaves no empty folders.
    """
    folder = Path(folder)
    created: list[Path] = []
    try:
        with output_errors(folder, option=option):
            missing: list[Path] = []
            p = folder
            while not p.is_dir() and p.parent != p:
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                try:
                    os.mkdir(d)
                except FileExistsError:
                    if not d.is_dir():  # a file where the folder should be
                        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(d)) from None
                    continue  # made by someone else meanwhile
                created.append(d)
    except BaseException:
        remove_dirs(created)
        raise
    return created


def remove_dirs(created: Sequence[Path]) -> None:
    """Remove the folders :func:`make_dirs` created, innermost first, as long as they are empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            continue  # removed already (e.g. with the tree it held)
        except OSError:
            return  # not empty (something was written there, or by someone else): keep it and its parents


def _temp_name(final: Path, kind: str) -> Path:
    """A hidden sibling of ``final``: ``.<name>.<kind>-<random>``."""
    return final.with_name(f".{final.name}.{kind}-{secrets.token_hex(4)}")


def _create_temp(final: Path, folder: bool) -> Path:
    """Create an empty temporary file (mode 0666 less umask) or folder beside ``final``; errors name ``final``."""
    for _ in range(100):
        tmp = _temp_name(final, "tmp")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (after a rename); best effort: not every platform can open a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                _fsync(path)
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------------- one file
@contextmanager
def atomic_path(path: StrPath, *, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, sync it and rename it to ``path``.

    The block writes the temporary (it exists, empty, so the name is taken). If anything
    fails, the temporary and the folders created for it are removed and ``path`` is left
    as it was; write failures are raised as :class:`OutputError` naming ``path``.

    Args:
        path: the file to write (replaced if it exists).
        option: the setting that chose ``path`` (named in error messages).
    """
    final = Path(path)
    created = make_dirs(final.parent, option=option)
    renames: list[tuple[Path, Path]] = []
    tmp: Path | None = None
    try:
        with output_errors(final, option=option, renames=renames):
            tmp = _create_temp(final, folder=False)
            renames.append((tmp, final))
            yield tmp
            _fsync(tmp)
            os.replace(tmp, final)
            tmp = None
            _fsync_dir(final.parent)
    except BaseException:
        if tmp is not None:
            _remove(tmp)
        remove_dirs(created)
        raise


def write_bytes(path: StrPath, data: bytes, *, option: str = "--out") -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return ``path``."""
    with atomic_path(path, option=option) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return Path(path)


def write_text(path: StrPath, text: str, *, encoding: str = "utf-8", option: str = "--out") -> Path:
    """Write ``text`` to ``path`` atomically; return ``path``."""
    return write_bytes(path, text.encode(encoding), option=option)


def write_json(path: StrPath, data: Any, *, indent: int | None = 2, default: Any = None, option: str = "--out") -> Path:
    """Write ``data`` as JSON (plus a final newline) to ``path`` atomically; return ``path``.

    ``default`` is ``json.dumps``'s: how to serialise objects JSON does not know (e.g. ``str``).
    """
    return write_text(path, json.dumps(data, indent=indent, default=default) + "\n", option=option)


# ---------------------------------------------------------------------------- one folder
def _occupied(path: Path) -> bool:
    """``path`` exists and is a file or a non-empty folder (an empty folder may be replaced freely)."""
    if not os.path.lexists(path):
        return False
    return not path.is_dir() or path.is_symlink() or any(path.iterdir())


def _discard(tmp: Path, created: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    remove_dirs(created)


class StagedDir:
    """A folder built under a temporary name beside ``final`` and renamed into place by :meth:`commit`.

    For writers that fill a folder over a long time (one shard per finished stage);
    :func:`atomic_dir` wraps it for a ``with`` block. :meth:`discard` (or garbage collection
    and interpreter exit, as a safety net) removes the staging folder and the parent
    folders created for it.

    Args:
        final: the folder to write.
        overwrite: replace an existing non-empty ``final`` (else :class:`OutputError` at once).
        option: the setting that chose ``final`` (named in error messages).

    Attributes:
        path: the staging folder to write into.
    """

    def __init__(self, final: StrPath, *, overwrite: bool = False, option: str = "--out") -> None:
        self.final = Path(final)
        self.overwrite = overwrite
        self.option = option
        if not overwrite and _occupied(self.final):
            raise OutputError(f"output {self.final} already exists; choose another {option} or pass --overwrite.")
        created = make_dirs(self.final.parent, option=option)
        try:
            with output_errors(self.final, option=option):
                self.path = _create_temp(self.final, folder=True)
        except BaseException:
            remove_dirs(created)
            raise
        self._renames = [(self.path, self.final)]
        self._cleanup = weakref.finalize(self, _discard, self.path, created)

    @property
    def open(self) -> bool:
        """Neither committed nor discarded yet."""
        return self._cleanup.alive

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Raise write failures inside the block as :class:`OutputError` naming final paths."""
        with output_errors(self.final, option=self.option, renames=self._renames):
            yield

    def commit(self) -> Path:
        """Sync every staged file and rename the folder to ``final`` (moving an existing one aside
        until the new one is in place); on failure, discard the staging folder and raise."""
        try:
            with self.errors():
                _fsync_tree(self.path)
                self._place()
        except BaseException:
            self.discard()
            raise
        self._cleanup.detach()
        return self.final

    def _place(self) -> None:
        final = self.final
        if not os.path.lexists(final):
            try:
                os.replace(self.path, final)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise OutputError(
                        f"output {final} appeared while it was being written; choose another {self.option} or pass --overwrite."
                    ) from exc
                raise
        else:
            old = _temp_name(final, "old")
            os.replace(final, old)
            try:
                os.replace(self.path, final)
            except BaseException as exc:  # Ctrl-C included: put the previous folder back
                try:
                    os.replace(old, final)
                except OSError:
                    err = output_error(exc, final, option=self.option, renames=self._renames) if isinstance(exc, Exception) else None
                    reason = str(err).rstrip(".") if err is not None else f"cannot replace {final}: {exc!r}"
                    raise OutputError(f"{reason}; the previous {final} is kept as {old}.") from exc
                raise
            _remove(old)
        _fsync_dir(final.parent)

    def discard(self) -> None:
        """Remove the staging folder and the parent folders created for it (nothing if committed)."""
        self._cleanup()


@contextmanager
def atomic_dir(out: StrPath, *, overwrite: bool = False, option: str = "--out") -> Iterator[Path]:
    """Yield a staging folder that becomes ``out`` only if the block succeeds (see :class:`StagedDir`).

    Write failures inside the block are raised as :class:`OutputError` naming the file under
    its final name, after the staging folder is removed; an existing ``out`` is untouched.
    """
    staged = StagedDir(out, overwrite=overwrite, option=option)
    try:
        with staged.errors():
            yield staged.path
    except BaseException:
        staged.discard()
        raise
    staged.commit()


# ---------------------------------------------------------------------------- files published together
@contextmanager
def staging_dir(target: StrPath, *, option: str = "--out") -> Iterator[Path]:
    """A temporary folder beside ``target`` to build files in that :func:`publish` then moves next to it.

    The folder is always removed on exit (with whatever was not published), and so are
    parent folders created for it that hold nothing. Write failures inside the block are
    raised as :class:`OutputError`, a staged file named as it would be published.
    """
    final = Path(target)
    created = make_dirs(final.parent, option=option)
    try:
        with output_errors(final, option=option):
            stage = _create_temp(final, folder=True)
    except BaseException:
        remove_dirs(created)
        raise
    try:
        with output_errors(final, option=option, renames=[(stage, final.parent)]):
            yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        remove_dirs(created)  # only those left empty: nothing was published into them


def publish(staged: Sequence[Path], folder: StrPath, *, option: str = "--out") -> list[Path]:
    """Move ``staged`` files into ``folder`` under their own names, all or none, in order (the
    model file last, so a reader never finds it without its data file).

    Each file replaces its target atomically. Existing targets are hard-linked aside first,
    so if a later rename fails the earlier ones are rolled back and the folder holds what it
    held before (where the file system has no hard links, a replaced file cannot be restored).
    """
    folder = Path(folder)
    targets = [folder / p.name for p in staged]
    renames = list(zip(staged, targets))
    backups: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        with output_errors(folder, option=option, renames=renames):
            for path in staged:
                _fsync(path)
            for target in targets:
                if target.is_file() and not target.is_symlink():
                    backup = _temp_name(target, "old")
                    try:
                        os.link(target, backup)
                        backups[target] = backup
                    except OSError:
                        pass  # no hard links here: this one cannot be rolled back
            for path, target in renames:
                os.replace(path, target)
                placed.append(target)
            _fsync_dir(folder)
    except BaseException:
        for target in placed:
            saved: Path | None = backups.pop(target) if target in backups else None
            try:
                if saved is not None:
                    os.replace(saved, target)
                else:
                    target.unlink()
            except OSError:
                pass
        for backup in backups.values():
            _remove(backup)
        raise
    for backup in backups.values():
        _remove(backup)
    return placed


__all__ = [
    "FIXES",
    "WRITE_ERRNOS",
    "StagedDir",
    "atomic_dir",
    "atomic_path",
    "make_dirs",
    "os_errno",
    "output_error",
    "output_errors",
    "publish",
    "remove_dirs",
    "staging_dir",
    "write_bytes",
    "write_json",
    "write_text",
]
