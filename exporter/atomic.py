"""Writes that never lose data: staged folders swapped into place, one lock per output, atomic files.

- A folder is assembled in `.NAME.tmp-<pid>-<random>` beside its final place (mode from the umask,
  like any folder the user creates) and swapped in only when complete. On Linux the swap is one
  `renameat2(RENAME_EXCHANGE)`: at every instant NAME is either the old folder or the new one.
  Elsewhere (or on a file system without it) it is two renames: NAME -> `.NAME.old`, then the new
  folder -> NAME; a process killed between the two leaves NAME missing and `.NAME.old` present, and
  the next run for NAME (`recover`) renames `.NAME.old` back before doing anything else.
- `.NAME.lock` beside the output is held (`fcntl.flock`) by the one process writing NAME; a second
  export of the same NAME fails at once with a one-line message naming the holder (it does not wait).
- Temp folders of processes that no longer run (killed with SIGKILL, a power cut) are removed by the
  next run that writes into the same folder.
- Single files (reports) are written to a temp file in the same folder and renamed over the old one:
  a reader sees the old file or the new one, and a symbolic link at that name is replaced, never
  followed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UserError

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2():  # -> the libc function, or None where there is none (not Linux, old glibc)
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (renameat2 RENAME_EXCHANGE). False where the platform or
    the file system cannot; an OSError for any other failure."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def recovery_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the `.NAME.tmp-<pid>-<random>` folders and files in `folder` whose process is dead."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TMP.match(entry.name)
            if m is None or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    return removed


def recover(final: Path) -> str | None:
    """Finish an interrupted two-step replacement of `final` (call with its lock held). Returns what
    was done, for the log."""
    old = recovery_name(final)
    if not os.path.lexists(old):
        return None
    if not os.path.lexists(final):
        os.rename(old, final)
        return f"restored {final} from {old.name} (a previous run was interrupted while replacing it)"
    shutil.rmtree(old, ignore_errors=True)
    return f"removed {old.name} left by an interrupted run"


@dataclass
class OutputLock:
    """`.NAME.lock` beside `final`, held with flock by the process writing NAME (and NAME.failed)."""

    final: Path
    fd: int | None = None

    @property
    def path(self) -> Path:
        return self.final.with_name(f".{self.final.name}.lock")

    def acquire(self) -> "OutputLock":
        import fcntl

        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise UserError(
                f"{self.final.parent}: cannot write there ({exc.strerror}); pass a writable output folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise UserError(
                f"{self.final}: another export (pid {holder}) is writing this bundle now (it holds {self.path.name}); "
                "wait for it to finish, or export with another --name or --output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock; the file stays (unlinking races)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_dir(path: Path) -> Path:
    """A new folder whose mode follows the umask (mkdtemp's is 0700: unreadable to a CI uploader)."""
    os.mkdir(path, 0o777)
    return path


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A new temp folder beside `final`, removed if the body raises (or the process is killed: then
    by the next run, see `remove_stale_temps`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent)
    tmp = make_dir(temp_name(final))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Folders 0777 and files 0666 less the umask throughout `root`, as if the user had made them:
    libraries write some files 0600 and folders 0700 (mkdtemp), which a CI uploader or a web server
    running as another user cannot read."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask, follow_symlinks=False)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def install(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` at `final` (modes from the umask), replacing what is there
    atomically where the OS can (see the module docstring); call with `final`'s lock held."""
    apply_umask(tmp)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    if exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
        return
    old = recovery_name(final)
    if os.path.lexists(old):
        shutil.rmtree(old)
    os.rename(final, old)
    os.rename(tmp, final)  # killed before this line: `recover` restores `old` on the next run
    shutil.rmtree(old, ignore_errors=True)


def install_new(tmp: Path, final: Path) -> None:
    """Put `tmp` at `final`, which must not exist or be an empty folder: never replaces data."""
    apply_umask(tmp)
    try:
        os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise UserError(f"{final}: something was written there meanwhile; nothing was replaced") from None
        raise


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write `path` through a temp file in its folder and a rename: never half-written, never through
    a symbolic link at `path` (the rename replaces the link itself); the mode follows the umask."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def check_writable(folder: Path, hint: str) -> None:
    """Fail now, with one line, if files cannot be created in `folder` (read-only mount, permissions,
    an immutable folder), rather than after minutes of work."""
    probe = temp_name(folder / "write-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{folder}: cannot write there ({exc.strerror}); {hint}") from None
