"""Local paths (and ``file://``) under an :class:`~phi3v_tools.images.ImagePolicy`: the file's bytes, not decoded.

Paths are read only under the allowed directories. The check is lexical (the path made absolute and
normalised, ``~`` taken from $HOME; ``~user`` is refused, as expanding it would tell whether the user exists),
so nothing is asked of the file system about a path before it passes, and a path is used exactly as given (a
name may end with a space). The file is then opened from the allowed directory's descriptor one component at a
time with ``O_NOFOLLOW``: a symbolic link under an allowed directory is never followed, so swapping a file for a
link between the check and the open cannot lead outside. Only regular files are read (``O_NONBLOCK``: a FIFO
cannot block), at most the byte cap plus one byte. Where ``os.open`` takes no ``dir_fd`` (Windows), the
fallback checks each component with ``lstat``, opens with ``O_NOFOLLOW`` where it exists and compares the
opened file's device and inode with the checked one: best effort, as a directory could still be swapped for a
junction between the two.

Decoding is left to :func:`phi3v_tools.images.decode_bytes`; every error is an
:class:`~phi3v_tools.errors.ImageError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from typing import TYPE_CHECKING

from phi3v_tools.errors import ImageError

if TYPE_CHECKING:
    from phi3v_tools.images import ImagePolicy

# Opening paths without following links: from the allowed directory's descriptor where the OS allows it.
_DIR_FD = os.open in os.supports_dir_fd
_CLOEXEC = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0) | getattr(os, "O_BINARY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | _CLOEXEC
_LINK_ERRNOS = {errno.ELOOP, getattr(errno, "EMLINK", errno.ELOOP), getattr(errno, "EFTYPE", errno.ELOOP)}


class _NotThere(ImageError):
    """No file at a path that passed the directory check (a base64-looking string is then read as data)."""


def read_path(path: str, policy: ImagePolicy, *, missing_ok: bool = False) -> tuple[bytes, str]:
    """The bytes of the regular file at ``path`` (at most the byte cap plus one) and its name for messages.

    ``missing_ok``: a path outside every allowed directory, or one that cannot be opened, raises
    :class:`_NotThere` (the caller has another reading of the string).
    """
    shown = _shown(path)
    root, parts = _locate(path, policy, shown, quiet=missing_ok)
    try:
        fd = _open_nofollow(root, parts, path) if _DIR_FD else _open_checked(root, parts, path)
    except ImageError as exc:
        if missing_ok and not isinstance(exc, _NotThere):  # a base64-looking name that cannot be opened: data
            raise _NotThere(str(exc)) from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{shown} is not a regular file")
        if info.st_size > policy.max_bytes:
            raise ImageError(f"{shown} has {info.st_size} bytes; the limit is {policy.max_bytes}")
        chunks, left = [], policy.max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 2**20))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise ImageError(f"cannot read {shown} ({exc.strerror or type(exc).__name__})") from exc
    finally:
        os.close(fd)
    return b"".join(chunks), shown


def _locate(path: str, policy: ImagePolicy, shown: str, *, quiet: bool = False) -> tuple[str, list[str]]:
    """The allowed directory ``path`` is lexically under and the components below it. Asks the file system nothing.

    ``quiet``: a path outside every allowed directory raises :class:`_NotThere` (the caller has another reading).
    """
    if "\x00" in path:
        raise ImageError(f"{shown} is not a usable path (it contains a NUL byte)")
    expanded = _expand_home(path, shown)
    try:
        absolute = os.path.normpath(os.path.join(os.getcwd(), expanded))
    except (OSError, ValueError) as exc:
        raise ImageError(f"{shown} is not a usable path ({type(exc).__name__})") from exc
    separators = os.sep + (os.altsep or "")
    if ".." in re.split(f"[{re.escape(separators)}]", absolute):
        raise ImageError(f"{shown} is not a usable path ('..' is left after normalising it)")
    roots = [r for r in policy.allowed_roots if _is_under(absolute, r)]
    if not roots:
        if quiet:
            raise _NotThere(shown)
        allowed = ", ".join(str(d) for d in policy.allowed_dirs) or "none"
        raise ImageError(
            f"{shown} is outside the allowed directories ({allowed}){_spaces(path)}; allow more with "
            "PHI3V_ALLOWED_DIRS or --allow-dir, or send the image as a URL or base64"
        )
    root = max(roots, key=len)  # the most specific allowed directory
    below = absolute[len(root) :]
    return root, [p for p in re.split(f"[{re.escape(separators)}]", below) if p]


def _is_under(path: str, root: str) -> bool:
    if os.name == "nt":
        path, root = os.path.normcase(path), os.path.normcase(root)
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


def _expand_home(path: str, shown: str) -> str:
    """``~`` and ``~/...`` from $HOME (no look-up); ``~user`` is refused, as its expansion tells who exists."""
    if not path.startswith("~"):
        return path
    rest = path[1:]
    if rest and rest[0] not in os.sep + (os.altsep or ""):
        name = re.split(r"[\\/]", rest, maxsplit=1)[0]
        raise ImageError(
            f"{shown} starts with {_shown('~' + name)}: other users' home directories are not expanded (only '~' "
            f"and '~/...' are, from $HOME); give the full path, or {_shown('./' + path)} for a file whose name "
            "starts with '~'"
        )
    home = os.environ.get("HOME") or os.environ.get("USERPROFILE")
    if not home:
        raise ImageError(f"{shown} starts with '~' but HOME is not set; give the full path")
    return home + rest


def _open_nofollow(root: str, parts: list[str], path: str) -> int:
    """Open ``root/parts...`` walking down from the allowed directory's descriptor; no link is ever followed."""
    try:
        current = os.open(root, _DIR_FLAGS)  # the operator's directory: a link there is the operator's choice
    except OSError as exc:
        raise _open_error(exc, path, None, -1) from exc
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                opened = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS | _NOFOLLOW, dir_fd=current)
            except OSError as exc:
                raise _open_error(exc, path, part, current, last) from exc
            os.close(current)
            current = opened
        opened, current = current, -1
        return opened
    finally:
        if current >= 0:
            os.close(current)


def _open_checked(root: str, parts: list[str], path: str) -> int:
    """The fallback without ``dir_fd`` (Windows): lstat every component, open, and compare identities."""
    shown, where = _shown(path), root
    try:
        checked = os.stat(root)
        for i, part in enumerate(parts):
            where = os.path.join(where, part)
            checked = os.lstat(where)
            if stat.S_ISLNK(checked.st_mode) or getattr(checked, "st_reparse_tag", None):
                raise ImageError(_link_message(shown, part, i == len(parts) - 1))
        fd = os.open(where, _FILE_FLAGS if parts else _DIR_FLAGS)
    except OSError as exc:
        raise _open_error(exc, path, None, -1) from exc
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(fd)
        raise ImageError(f"{shown} changed while it was being opened; try again")
    return fd


def _open_error(exc: OSError, path: str, part: str | None, parent: int, last: bool = True) -> ImageError:
    shown = _shown(path)
    if exc.errno == errno.ENOENT:
        return _NotThere(f"no image file at {shown}{_spaces(path)}")
    is_link = exc.errno in _LINK_ERRNOS and _NOFOLLOW != 0
    if part is not None and parent >= 0 and exc.errno == errno.ENOTDIR:
        with contextlib.suppress(OSError):  # below an allowed directory: asking is fine
            is_link = stat.S_ISLNK(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode)
        if not is_link:
            return ImageError(f"no image file at {shown} ({part!r} is not a directory)")
    if is_link and part is not None:
        return ImageError(_link_message(shown, part, last))
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ImageError(f"cannot read {shown} (permission denied)")
    return ImageError(f"cannot read {shown} ({exc.strerror or type(exc).__name__})")


def _link_message(shown: str, part: str, last: bool) -> str:
    where = "is a symbolic link" if last else f"goes through a symbolic link ({part!r})"
    return (
        f"{shown} {where}; links are not followed under the allowed directories (one could lead outside the "
        "allowed directories); give the path of the file itself"
    )


def _spaces(path: str) -> str:
    """A hint when a name (the path's last part, or the whole of it) starts or ends with whitespace (paths are
    used exactly as given)."""
    name = re.split(r"[/\\]", path)[-1]
    path = path if path[:1].isspace() or not name else name
    names = {" ": "a space", "\t": "a tab", "\n": "a newline", "\r": "a carriage return"}
    ends = [f"{end} with {names.get(ch, 'whitespace')}" for end, ch in (("starts", path[:1]), ("ends", path[-1:]))]
    ends = [e for e, ch in zip(ends, (path[:1], path[-1:]), strict=True) if ch.isspace()]
    return f" (the name {' and '.join(ends)})" if ends else ""


def _shown(path: str) -> str:
    """A path for a message: quoted, and cut in the middle when long (a message must stay readable)."""
    return repr(path) if len(path) <= 160 else f"{path[:100]!r}...{path[-40:]!r} ({len(path)} characters)"
