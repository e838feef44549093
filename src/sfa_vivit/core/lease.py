"""One writer per output: a lease on a folder (local or gs://) that prep and training take before they
write there.

The lease is a small JSON object, `<out>/.sfa-lease.json`: who holds it (command, host, pid, a random
token, a `key`), since when, and a heartbeat the holder rewrites every `HEARTBEAT_S` seconds from a
background thread. Taking it is atomic: `O_CREAT | O_EXCL` on a local disk; on an object store a create
that fails if the object exists (GCS: `ifGenerationMatch=0`), then a read-back that the object holds our
token (which also covers a store that ignores the precondition, as the GCS emulator does).

A second writer is refused with one line naming the holder. A lease is taken over when its holder is
gone: its heartbeat is older than `STALE_S` (any host), or its pid is no longer alive (same host), or it
was taken with the same `key` as ours: a KFP step passes a key naming its task's output, so a retried pod
takes over its own previous attempt's lease at once (Argo starts a retry only after the attempt ended).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from sfa_vivit.core.storage import is_local, join, url_to_fs, write_bytes_atomic

log = logging.getLogger(__name__)

LEASE_FILE = ".sfa-lease.json"
HEARTBEAT_S = float(os.environ.get("SFA_LEASE_HEARTBEAT_S", 15.0))
STALE_S = float(os.environ.get("SFA_LEASE_STALE_S", 90.0))


_RELEASED = "released meanwhile"
LOCK_WAIT_S = 5.0
# Lock descriptors open in this process: a forked child (a DataLoader worker) closes its copies at once, so it
# never holds the parent's lock for its lifetime.
_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class LeaseHeld(RuntimeError):
    """Another live writer holds the output."""


class Lease:
    """Hold the lease on `out` for `command` (use as a context manager, or `acquire()` / `release()`).

    key: who may take the lease over at once (a retry of the same task); default: this process only.
    Raises LeaseHeld on acquire when another live writer holds it; OSError when `out` cannot be written
    (a bucket that does not exist, a read-only folder): said before any work starts."""

    def __init__(self, out: str, command: str, *, key: str | None = None, stale_s: float = STALE_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.out, self.url = os.fspath(out), join(os.fspath(out), LEASE_FILE)
        self.command, self.stale_s, self.heartbeat_s = command, stale_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self.key = key or f"{socket.gethostname()}:{os.getpid()}:{self.token}"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False
        self._waited_once = False
        self._made_folder: str | None = None

    # -- the record -------------------------------------------------------------------------------
    def _record(self) -> bytes:
        return json.dumps({"command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                           "host_id": _host_id(), "token": self.token, "key": self.key, "started": self.started,
                           "heartbeat": time.time()}).encode()

    def _read(self) -> dict[str, Any] | None:
        fs, path = url_to_fs(self.url)
        for attempt in range(3):
            try:
                return json.loads(fs.cat_file(path))
            except FileNotFoundError:
                return None
            except ValueError:
                time.sleep(0.1)     # caught mid-write by a store without atomic replace: read again
        # Foreign bytes: a holder of unknown age.
        return {"heartbeat": 0, "command": "?", "host": "?", "pid": -1, "key": "", "token": "", "host_id": ""}

    def _create(self) -> bool:
        """Create the lease object if there is none. True when we hold it."""
        fs, path = url_to_fs(self.url)
        if is_local(fs):
            folder = url_to_fs(self.out)[1]
            if not os.path.isdir(folder):
                os.makedirs(folder)
                self._made_folder = folder
        data = self._record()
        if is_local(fs):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            if fs.exists(path):                      # what the precondition says, for a store that ignores it
                return False
            with fs.open(path, "xb") as f:          # GCS: ifGenerationMatch=0
                f.write(data)
        except FileExistsError:
            return False
        except Exception as e:  # noqa: BLE001 - whatever the store says, said once with the URL
            if "412" in str(e) or "precondition" in str(e).lower():
                return False
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise OSError(f"cannot write {self.url} ({type(e).__name__}: {first[:200]}): does the bucket exist, and "
                          "may this identity write to it?") from None
        time.sleep(0.5)          # a store that ignores the precondition: the last writer wins; check it was us
        current = self._read()
        return current is not None and current.get("token") == self.token

    def _gone(self, holder: dict[str, Any]) -> str | None:
        """Why the holder no longer holds the output, or None while it does."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("key") == self.key:
            return "it was taken by an earlier attempt of this same step"
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old"
        if holder.get("host_id") == _host_id():        # this machine and process namespace: its pids are ours
            pid = int(holder.get("pid", -1))
            if pid == os.getpid():
                return "it was taken earlier in this same process, which is the writer"
            if not _alive(pid):
                return f"its process {pid} is no longer running"
        return None

    # -- acquire / release ------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        for _ in range(5):
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue                     # released meanwhile: try again
            why = self._gone(holder) or self._watch(holder)
            if why == _RELEASED:
                continue
            if why is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise LeaseHeld(
                    f"{self.out} is being written by another {holder.get('command', '?')} (host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, heartbeat {age:.0f} s ago): one writer per "
                    f"output; wait for it, use another output, or delete {self.url} if that process is gone "
                    f"(a lease with no heartbeat for {self.stale_s:.0f} s is taken over)")
            log.warning("%s: taking over the lease of %s (pid %s on %s): %s", self.out, holder.get("command"),
                        holder.get("pid"), holder.get("host"), why)
            with self._locked():                 # no heartbeat of the old holder lands between remove and create
                self._remove_if(holder.get("token"))
                if self._create():
                    break
        else:
            raise LeaseHeld(f"{self.out}: could not take the lease {self.url} (other writers keep taking it)")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="sfa-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _watch(self, holder: dict[str, Any]) -> str | None:
        """A holder we cannot see die (another host): watch its heartbeat. It beats within a heartbeat
        interval: live (None). It does not: its pod or node is gone (a preempted node, a killed job being
        restarted), so wait until it goes stale, then say why to take it over."""
        seen, token = holder.get("heartbeat"), holder.get("token")
        patience = self.heartbeat_s * 1.5 + 1
        start = time.time()
        while True:
            time.sleep(min(0.2, self.heartbeat_s / 4))
            current = self._read()
            if current is None or current.get("token") != token:
                return _RELEASED                                 # the caller tries to create it again
            if current.get("heartbeat") != seen:
                return None                                      # it beats: a live writer
            why = self._gone(current)
            if why is not None:
                return why
            if time.time() - start > patience and not self._waited_once:
                self._waited_once = True
                log.warning("%s: the lease of %s (pid %s on %s) has not been renewed for %.0f s; waiting until it is "
                            "%.0f s old to take it over", self.out, current.get("command"), current.get("pid"),
                            current.get("host"), time.time() - float(seen or 0), self.stale_s)

    @contextlib.contextmanager
    def _locked(self):
        """On a local disk, hold an exclusive flock on the output folder while a heartbeat reads and rewrites
        the record, while a taker removes and recreates it, and while a holder removes its own: a holder being
        taken over cannot write its record over its successor's, nor remove it. (An object store has no such
        lock; there the window is one read-to-write of a holder that is alive while it is taken over, which a
        retry of the same step is not.) The lock is waited for at most LOCK_WAIT_S, then gone without: a
        filesystem without flock on folders (NFS) or a stuck holder degrades to the unlocked behaviour, never
        to a heartbeat that blocks until the lease goes stale."""
        fs, _ = url_to_fs(self.url)
        if not is_local(fs):
            yield
            return
        try:
            fd = os.open(url_to_fs(self.out)[1], os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            yield
            return
        _LOCK_FDS.add(fd)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log.warning("%s: the folder's lock is held elsewhere for %.0f s; going on without it",
                                    self.out, LOCK_WAIT_S)
                        break
                    time.sleep(0.02)
                except OSError:                  # no flock on this filesystem
                    break
            yield
        finally:
            _LOCK_FDS.discard(fd)
            os.close(fd)                         # closing the descriptor releases the lock

    def _remove_if(self, token: str | None) -> None:
        """Remove the lease object if it still holds `token` (a stale holder's), not a newer one."""
        current = self._read()
        if current is not None and current.get("token") == token:
            fs, path = url_to_fs(self.url)
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass

    def _beat(self) -> None:
        fs, path = url_to_fs(self.url)
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._locked():
                    current = self._read()
                    if current is None or current.get("token") != self.token:
                        log.error("%s: the lease %s was taken by another writer; this one stops renewing it",
                                  self.out, self.url)
                        return
                    write_bytes_atomic(self.url, self._record())     # never a torn record for a reader
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the lease goes stale only after STALE_S
                log.warning("%s: could not renew the lease (%s: %s)", self.out, type(e).__name__, e)

    def release(self, *, remove_empty_folder: bool = False) -> None:
        """Give the lease up. remove_empty_folder: also remove the output folder if taking the lease made it
        and nothing was written there since (a run refused after the lease leaves no trace)."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self._locked():
                self._remove_if(self.token)
        except Exception as e:  # noqa: BLE001 - the work is done; a leftover lease goes stale on its own
            log.warning("%s: could not remove the lease %s (%s); it goes stale in %.0f s", self.out, self.url, e,
                        self.stale_s)
        self.held = False
        if remove_empty_folder and self._made_folder:
            try:
                os.rmdir(self._made_folder)          # only if empty
            except OSError:
                pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, killed but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _host_id() -> str:
    """This host and pid namespace: pids of a lease holder are ours to check only where this matches (containers
    that share a host name do not share pids)."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "/".join(parts)


def lease_key() -> str | None:
    """The key a retried attempt of the same pipeline step shares (`SFA_LEASE_KEY`, set by the KFP steps);
    None outside a pipeline."""
    return os.environ.get("SFA_LEASE_KEY") or None
