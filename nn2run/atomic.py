"""Replacing a file atomically (POSIX), as shell redirection would name it but without ever leaving
it half written.

`write_atomic(path, chunks)` writes to a temp file `.NAME.XXXXXXXX.tmp` in the directory of
the file `path` names, fsyncs it, renames it over that file and fsyncs the directory. A
symlink is followed: its target is replaced (in the target's own directory, so the rename
stays atomic) and the link stays a link. An existing path that is not a regular file (a
directory, a FIFO, a socket, a device node) is refused: renaming over it would destroy it.

A writer holds an exclusive `flock` on its temp file until the rename, so a temp file that
nobody holds was left by a writer that was killed; the next write of the same file removes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

_TEMP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")   # tempfile's random names

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def target_of(path) -> str:
    """The file a write to `path` replaces: the end of a chain of symlinks, else `path` itself."""
    return os.path.realpath(os.fspath(path))


def not_regular(path) -> str | None:
    """What `path` (followed through symlinks) is when it exists and is not a regular file,
    e.g. "a FIFO"; None when it is a regular file or does not exist."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def check_replaceable(path) -> None:
    """Raise OSError (strerror says why) unless a regular file may be written at `path`."""
    kind = not_regular(path)
    if kind is not None:
        code = errno.EISDIR if kind == "a directory" else errno.EINVAL
        raise OSError(code, f"it is {kind}, not a regular file", os.fspath(path))


def write_atomic(path, chunks) -> None:
    """Replace the file `path` names with the bytes of `chunks` (buffers), atomically.

    On any error the temp file is removed, the file is left as it was and the exception
    propagates (OSError for I/O). A new file gets mode 0644; a replaced one keeps its mode.
    Only a failure to fsync the directory comes after the new file is in place.
    """
    target = target_of(path)
    check_replaceable(target)
    folder, name = os.path.split(target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = 0o644
    remove_stale(folder, name)
    fd, tmp = _locked_temp(folder, name)
    try:
        try:
            os.fchmod(fd, mode)
            for chunk in chunks:
                _write_all(fd, memoryview(chunk).cast("B"))
            os.fsync(fd)
            os.replace(tmp, target)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    finally:
        os.close(fd)            # the lock goes only now: the temp name is gone already
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _prefix(name: str) -> str:
    return "." + name[:64] + "."


def _locked_temp(folder: str, name: str) -> tuple[int, str]:
    import tempfile  # here, not at the top: loading a model should not pay for it
    while True:
        fd, tmp = tempfile.mkstemp(prefix=_prefix(name), suffix=".tmp", dir=folder)
        fcntl.flock(fd, fcntl.LOCK_EX)       # a cleaner holds it for a moment at most
        if os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)            # a cleaner took it for stale before we locked it: make another


def remove_stale(folder: str, name: str) -> list[str]:
    """Remove the temp files of `name` in `folder` that no live writer holds; returns their paths."""
    prefix = _prefix(name)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for entry in names:
        middle = entry[len(prefix):-len(".tmp")]
        if (entry.startswith(prefix) and entry.endswith(".tmp") and len(middle) == 8
                and set(middle) <= _TEMP_CHARS and _remove_if_abandoned(os.path.join(folder, entry))):
            removed.append(os.path.join(folder, entry))
    return removed


def _remove_if_abandoned(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False                # a live writer holds it
        if os.lstat(path).st_ino != st.st_ino:
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]
