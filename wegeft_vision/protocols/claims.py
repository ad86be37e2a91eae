"""Claims: which process trains a run, so that processes sharing a results folder never train
one run twice.

A claim is a small JSON file (pid, host, start time, a random token) created atomically: written
under a temporary name, then hard-linked to the claim's name, which fails when the name exists.
``link`` is atomic on NFS too, where ``O_CREAT | O_EXCL`` was not always (file systems without
hard links fall back to ``O_EXCL``). While the run trains, a thread refreshes the file's
modification time (the heartbeat). A claim is stale, and is broken and taken over, when its
process is gone (same host, no such pid) or its heartbeat is older than the timeout (another
host, or a hung process): a job killed by SLURM or a power cut blocks nothing for long.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger("wegeft_vision.protocols")

DEFAULT_TIMEOUT_S = 600.0
# Tokens of the claims this process holds: a claim naming this process's pid but another token
# was left by an earlier process that had the same pid (containers reuse small pids).
_HELD: set[str] = set()


@dataclass(frozen=True)
class ClaimInfo:
    pid: int
    host: str
    started: float
    token: str

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"process {self.pid} on {self.host} (since {started})"


def read_claim(path: Path) -> Optional[ClaimInfo]:
    """The claim at ``path``, or None when there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text())
        return ClaimInfo(int(data["pid"]), str(data["host"]), float(data["started"]),
                         str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _create(path: Path, info: ClaimInfo) -> bool:
    """Create the claim file atomically; False when it exists already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(info))
    tmp = path.with_name(f"{path.name}.{info.token}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        try:  # no hard links here: exclusive create
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_reason(path: Path, info: Optional[ClaimInfo], timeout_s: float) -> Optional[str]:
    """Why the claim at ``path`` is stale, or None while its holder may still be working."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "released"
    if age > timeout_s:
        return f"no heartbeat for {age:.0f} s (timeout {timeout_s:.0f} s)"
    if info is not None and info.host == socket.gethostname():
        if info.pid == os.getpid() and info.token not in _HELD:
            return f"left by an earlier process with this pid ({info.pid})"
        if not _pid_alive(info.pid):
            return f"its process {info.pid} on {info.host} is gone"
    return None


def _break(path: Path, seen: Optional[ClaimInfo]) -> None:
    """Remove the stale claim ``seen``, unless another process renewed the claim meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    taken = read_claim(aside)
    if seen is not None and taken is not None and taken.token != seen.token:
        try:  # a fresh claim: put it back
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


class Claim:
    """A claim this process holds; ``release()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, path: Path, info: ClaimInfo, heartbeat_s: float) -> None:
        self.path, self.info = path, info
        self._stop = threading.Event()
        _HELD.add(info.token)
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"claim heartbeat {path.name}")
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            holder = read_claim(self.path)
            if holder is None or holder.token != self.info.token:
                logger.error("lost the claim %s (now %s)", self.path,
                             holder.describe() if holder else "gone")
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        holder = read_claim(self.path)
        if holder is not None and holder.token == self.info.token:
            self.path.unlink(missing_ok=True)
        _HELD.discard(self.info.token)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_claim(path: Path, timeout_s: float = DEFAULT_TIMEOUT_S,
              heartbeat_s: Optional[float] = None) -> tuple[Optional[Claim], Optional[ClaimInfo]]:
    """Claim ``path``: ``(claim, None)``, or ``(None, holder)`` while another live process holds
    it. A stale claim is broken (with a warning naming its holder and why) and taken over."""
    if timeout_s <= 0:
        raise ValueError(f"the claim timeout must be positive, got {timeout_s}")
    info = ClaimInfo(os.getpid(), socket.gethostname(), time.time(), uuid.uuid4().hex)
    holder = None
    for _ in range(5):
        if _create(path, info):
            return Claim(path, info, heartbeat_s or timeout_s / 10), None
        holder = read_claim(path)
        reason = stale_reason(path, holder, timeout_s)
        if reason is None:
            return None, holder
        if reason != "released":
            logger.warning("taking over the stale claim %s of %s: %s", path,
                           holder.describe() if holder else "an unreadable claim", reason)
            _break(path, holder)
    return None, holder
