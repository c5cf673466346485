"""Private files and folders, safe on shared filesystems and shared nodes: the one place kscale creates
anything another user must not read or replace (``cluster.env`` files, Ray tokens, TLS keys, record dirs,
node temp dirs).

- :func:`private_dir` creates a folder ``0700``, or accepts an existing one only when it is a real folder
  (not a symbolic link), owned by this user and writable by nobody else; anything else is refused with
  :class:`UnsafePath`, which names the path and the fix. A folder that passes cannot be filled by
  another user, so names inside it cannot be planted.
- :func:`write_private` writes a ``0600`` file inside such a folder: through a descriptor of the checked
  folder (no path walk after the check), a fresh random temporary name opened ``O_CREAT | O_EXCL |
  O_NOFOLLOW`` (a planted file or link makes it fail, never receive the text), then renamed over the
  target (a rename replaces a link, it never writes through one).
- ``cluster.env`` files (:func:`write_env_file`) hold shell ``export`` lines: the Slurm script sources
  them; :func:`read_env_file` parses the same text for Python (the Ray Jobs driver wrapper and
  :func:`apply_env_file`, the Ray worker setup hook) after checking the file is still ours and ``0600``.

Every ``cluster.env`` value is treated as a secret: it exists in one such file (or a Kubernetes Secret)
and reaches processes only from there; records, logs, rendered scripts and manifests, argv and Ray
runtime environments carry the variable names only. Nothing here imports from the rest of kscale except
the error base, so any layer may use it.
"""

from __future__ import annotations

import os
import secrets
import shlex
import stat
from pathlib import Path

from kscale.errors import KscaleError

ENV_FILE_VAR = "KSCALE_ENV_FILE"  # the path (not the values) of a run's cluster.env file, for Ray Jobs
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


class UnsafePath(KscaleError):
    """A folder or file that another user could read, replace or plant; the message says what to fix."""


def _check(path: Path, st: os.stat_result, kind: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is a symbolic link; kscale keeps private {kind}s only in real folders it owns")
    if kind == "folder" and not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} exists and is not a folder")
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{path} is not a regular file")
    if st.st_uid != os.getuid():
        raise UnsafePath(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): another user "
                         f"created it; remove it or choose another path")
    loose = 0o022 if kind == "folder" else 0o077
    if st.st_mode & loose:
        fix = "chmod go-w" if kind == "folder" else "chmod 600"
        raise UnsafePath(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: "
                         f"{'writable' if kind == 'folder' else 'readable or writable'} by other users "
                         f"({fix} {path}, or remove it)")


def private_dir(path: str | Path) -> Path:
    """``path`` as a folder only this user can change: created ``0700`` (parents as usual) or, when it
    exists, checked (real folder, ours, no group/other write). Returns the path; raises :class:`UnsafePath`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    fd = _open_dir(path)
    try:
        if created:
            os.fchmod(fd, 0o700)  # whatever the umask
    finally:
        os.close(fd)
    return path


def _open_dir(path: Path) -> int:
    """A descriptor of ``path`` (not following a final link), checked as a private folder."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        try:
            _check(path, os.lstat(path), "folder")
        except FileNotFoundError:
            pass
        raise UnsafePath(f"cannot open {path} as a folder: {e}") from e
    try:
        _check(path, os.fstat(fd), "folder")
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (``0600`` from creation) in a private folder (:func:`private_dir`)."""
    path = Path(path)
    private_dir(path.parent)
    dfd = _open_dir(path.parent)
    try:
        tmp = f".{path.name}.tmp-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", closefd=False) as f:
                f.write(text)
                f.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)
    return path


def read_private(path: str | Path) -> str:
    """The text of a file written by :func:`write_private`, refused unless it is still a regular file of
    ours with mode ``0600`` (opened without following a link)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise UnsafePath(f"cannot open the private file {path}: {e}") from e
    with os.fdopen(fd) as f:
        _check(path, os.fstat(f.fileno()), "file")
        return f.read()


# ----------------------------------------------------------------------------- cluster.env files


def write_env_file(path: str | Path, env: dict[str, str]) -> Path:
    """``cluster.env`` as shell ``export`` lines (values quoted) in a ``0600`` file."""
    return write_private(path, "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in sorted(env.items())))


def read_env_file(path: str | Path) -> dict[str, str]:
    """The variables of a :func:`write_env_file` file (its owner and mode checked first)."""
    out = {}
    words = shlex.split(read_private(path), comments=True)
    for i, word in enumerate(words):
        if word == "export":
            continue
        key, sep, value = word.partition("=")
        if not sep or not key.isidentifier() or i == 0 or words[i - 1] != "export":
            raise UnsafePath(f"{path}: not a kscale env file (unexpected {key[:40]!r})")
        out[key] = value
    return out


def apply_env_file() -> None:
    """Ray's ``worker_process_setup_hook`` for Ray Jobs submissions: put the variables of the file named by
    ``KSCALE_ENV_FILE`` into this worker's environment (the runtime env carries only that path)."""
    path = os.environ.get(ENV_FILE_VAR)
    if path:
        os.environ.update(read_env_file(path))
