"""Local server processes started and stopped by fleetserve.

SeaweedFS (`devstack.seaweed`), Prometheus (`devstack.prometheus`) and the Ray head
(`devstack.ray_head`) all run the same way, through `ManagedProcess`:

- The command is started in its own session (`start_new_session=True`), so its process id is
  also its process-group id and its session id, and its output is appended to a log file
  created with mode 0600.
- The process is recorded as its pid plus a fingerprint (its start time), so a pid that was
  reused by an unrelated process is never taken for ours, and never signalled.
- Another process (`fleetserve down`) can adopt it from that record and stop it.
- Stopping signals only that process group (SIGTERM, then SIGKILL after a timeout) and then
  sweeps whatever the process left behind in its session.

The module also holds the helpers they share: liveness and fingerprint checks, and atomic
private (0600) files. Free loopback ports are in `devstack.ports`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from devstack.ports import port_is_open

logger = logging.getLogger(__name__)

_POLL_S = 0.1

__all__ = [
    "ManagedProcess",
    "pid_alive",
    "process_fingerprint",
    "process_matches",
    "session_members",
    "terminate_process_group",
    "write_private_file",
]


# --------------------------------------------------------------------------- processes
def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie, where that can be told)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    proc_stat = _read_proc_stat(pid)
    return not (proc_stat is not None and proc_stat[0] == "Z")


def _read_proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def process_fingerprint(pid: int) -> str | None:
    """A value that identifies one process over its lifetime (its start time), or None.

    Used to check that a recorded pid still belongs to the process we started and has not
    been reused by an unrelated one. Linux reads /proc; elsewhere psutil is used when present.
    """
    proc_stat = _read_proc_stat(pid)
    if proc_stat is not None and len(proc_stat) > 19:
        return f"proc:{proc_stat[19]}"  # field 22 of stat: start time in clock ticks since boot
    try:
        import psutil
    except ImportError:
        return None
    try:
        return f"psutil:{psutil.Process(pid).create_time():.3f}"
    except (psutil.Error, OSError):
        return None


def process_matches(pid: int, fingerprint: str | None) -> bool:
    """Whether `pid` is alive and, when a fingerprint was recorded, is the same process."""
    if not pid_alive(pid):
        return False
    if fingerprint is None:
        return True
    return process_fingerprint(pid) == fingerprint


def terminate_process_group(
    pid: int,
    *,
    fingerprint: str | None = None,
    timeout_s: float = 20.0,
    signal_group_first: bool = True,
    popen: subprocess.Popen[bytes] | None = None,
    leftover_grace_s: float = 5.0,
    error: type[Exception] = RuntimeError,
) -> bool:
    """Stop a process we started in its own session (so its pgid equals its pid).

    Sends SIGTERM (to the whole group, or to the leader only when `signal_group_first` is
    false, for programs that clean up their own children), waits until the leader is gone or
    `timeout_s` passes (then SIGKILLs the group), and finally gives processes of its session
    that are still alive `leftover_grace_s` before SIGKILLing them. Nothing is signalled when
    `pid` is no longer the recorded process (`fingerprint` mismatch) or is not a group
    leader: a reused pid never gets a signal from here.

    Returns:
        True when the process was ours and is gone now; False when there was nothing to stop.

    Raises:
        error: `pid` is not a process-group leader, or it survived SIGKILL.
    """
    if popen is not None:
        if popen.poll() is not None:  # already exited (and now reaped): nothing to signal
            return False
    elif not process_matches(pid, fingerprint):
        return False
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        _reap(popen)
        return False
    if pgid != pid:
        raise error(f"process {pid} is not a process-group leader; refusing to signal it")
    with contextlib.suppress(ProcessLookupError):
        if signal_group_first:
            os.killpg(pgid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, popen, timeout_s):
        logger.warning("process did not stop in time; killing its group", extra={"pid": pid})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if not _wait_gone(pid, popen, 10.0):
            raise error(f"process {pid} survived SIGKILL")
    # The leader is gone; whatever it started and left behind goes now: its process group,
    # and (Linux) every process of the session it led, which children that moved to their
    # own process groups (Ray workers do) still belong to.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    _kill_session_leftovers(pid, grace_s=leftover_grace_s)
    return True


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (Linux, from /proc; elsewhere an empty list)."""
    members = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        proc_stat = _read_proc_stat(int(entry.name))
        # after the command name: state, ppid, pgrp, session, ...
        if proc_stat and len(proc_stat) > 3 and proc_stat[0] != "Z" and int(proc_stat[3]) == sid:
            members.append(int(entry.name))
    return members


def _kill_session_leftovers(sid: int, grace_s: float) -> None:
    """Give members of our (leaderless) session `grace_s` to exit, then SIGKILL them.

    The kernel does not hand out a pid that is still in use as a session id, so every member
    found here descends from the process we started.
    """
    deadline = time.monotonic() + grace_s
    while (members := session_members(sid)) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    if members:
        logger.warning(
            "killing processes left behind", extra={"session": sid, "count": len(members)}
        )
    for member in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # SIGKILL is delivered asynchronously
    while members and (members := session_members(sid)) and time.monotonic() < deadline:
        time.sleep(_POLL_S / 10)


def _reap(popen: subprocess.Popen[bytes] | None) -> None:
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=0)


def _wait_gone(pid: int, popen: subprocess.Popen[bytes] | None, timeout_s: float) -> bool:
    """Wait until `pid` has exited (reaping it when it is our child); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        if popen is not None:
            if popen.poll() is not None:
                return True
        elif not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


# --------------------------------------------------------------------------- files
def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically with mode 0600 (for files that hold secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------- base class
class ManagedProcess:
    """One local server process in its own session, started (or adopted) and stopped here.

    Subclasses build the command and say when the server is ready: they implement `start()`
    (checks, config files, then `_spawn`) and `wait_ready()`, record `_process_state()` in
    their `state()`, and call `_adopt()` in their `from_state()`. Used as a context manager,
    an object is started and waited for on entry (and stopped again if that fails), and
    stopped on exit.

    Args:
        log_path: Where the process's stdout and stderr go (appended; created with mode 0600).
    """

    # The error raised when the process cannot be stopped (each server has its own).
    error: ClassVar[type[Exception]] = RuntimeError
    # SIGTERM the whole group (True), or only the leader, for programs that stop their own
    # children (`ray start --block`).
    signal_group_first: ClassVar[bool] = True
    # How long processes left in the session get after the leader is gone.
    leftover_grace_s: ClassVar[float] = 5.0

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._fingerprint: str | None = None

    @property
    def pid(self) -> int | None:
        """The process id while it is started (or adopted), else None."""
        return self._pid

    @property
    def fingerprint(self) -> str | None:
        """The recorded fingerprint (start time) of `pid`, else None."""
        return self._fingerprint

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Launch the process (returns at once; see `wait_ready`)."""
        raise NotImplementedError

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Poll until the server answers; returns seconds waited."""
        raise NotImplementedError

    def _spawn(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Start `cmd` in its own session, output appended to `log_path`; record pid."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        self._pid = self._proc.pid
        self._fingerprint = process_fingerprint(self._pid)

    def is_running(self) -> bool:
        """Whether the process (started or adopted here) is alive and is the one recorded."""
        if self._proc is not None:
            return self._proc.poll() is None
        return self._pid is not None and process_matches(self._pid, self._fingerprint)

    def _is_ours(self) -> bool:
        """Whether a process was recorded that is ours: our child (even if it has exited
        since), or an adopted pid that still matches its fingerprint."""
        if self._pid is None:
            return False
        return self._proc is not None or process_matches(self._pid, self._fingerprint)

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop the process this object started or adopted: SIGTERM, wait, then SIGKILL.

        Only the recorded process group is signalled, and only while its leader is still the
        process that was started (checked by start time), so a reused pid is never touched.

        Returns:
            True when a running process was stopped; False when there was nothing to stop.
        """
        if self._pid is None:
            return False
        stopped = terminate_process_group(
            self._pid,
            fingerprint=self._fingerprint,
            timeout_s=timeout_s,
            signal_group_first=self.signal_group_first,
            popen=self._proc,
            leftover_grace_s=self.leftover_grace_s,
            error=self.error,
        )
        self._proc, self._pid, self._fingerprint = None, None, None
        return stopped

    def kill(self) -> None:
        """Crash the process on purpose (SIGKILL to its group, no clean shutdown), for tests.

        `start()` on the same object starts it again.
        """
        if self._pid is None:
            return
        if self.is_running():  # never signal a pid that was already reaped
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._pid, signal.SIGKILL)
        self.stop(timeout_s=10.0)

    @staticmethod
    def _wait_port_closed(port: int, timeout_s: float = 5.0, poll_s: float = _POLL_S) -> None:
        """Wait (at most `timeout_s`) until nothing listens on `port` any more: a process can
        be reaped a moment before its listeners close."""
        deadline = time.monotonic() + timeout_s
        while port_is_open(port) and time.monotonic() < deadline:
            time.sleep(poll_s)

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The end of the process's log (for error messages)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - max_bytes))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ state
    def _process_state(self) -> dict[str, Any]:
        """The `pid` and `fingerprint` entries of a state dict."""
        return {"pid": self._pid, "fingerprint": self._fingerprint}

    def _adopt(self, state: Mapping[str, Any]) -> None:
        """Take over the process recorded in `state` (by `_process_state`), if there is one.

        It is only treated as running (and only ever signalled) while its pid still belongs
        to the process that was started (same start time).
        """
        if state.get("pid"):
            self._pid = int(state["pid"])
            self._fingerprint = state.get("fingerprint")
