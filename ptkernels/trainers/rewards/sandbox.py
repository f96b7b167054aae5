"""Run untrusted Python (model-written code) in a sandbox the operating system enforces.

``run_python(source)`` never evaluates ``source`` in the calling process. It runs it in a fresh interpreter inside
bubblewrap (``bwrap``; see ``rewards/bwrap.py`` for the mounts and namespaces, ``rewards/seccomp.py`` for the
system-call filter, ``rewards/runner.py`` for the trusted code that starts each run). Layers, all enforced by the
kernel, none undoable by the child:

* **Namespaces**: PID (the child sees and can signal only its own processes; when the run ends its PID-1 dies and
  the kernel kills every process left, daemons included), network (a down loopback device only), mount (a
  read-only root holding only the interpreter, its standard library and shared libraries: no host ``/tmp``,
  sockets, home or ``/etc``), IPC (no host shared memory or message queues), UTS.
* **Private, capped memory for files**: the working directory, ``/tmp`` and ``/dev/shm`` share one tmpfs of
  ``tmpfs_mb``; it vanishes with the run, so nothing is ever left on the host.
* **Identity**: as root, a fresh throwaway uid per run, checked against the user database (NSS, so directory
  services too) before use, no groups and no capabilities; as an ordinary user, a user namespace in which further
  user namespaces are disabled. ``no_new_privs`` either way; a new session (no terminal); dies with its parent.
* **seccomp**: ptrace, process_vm_*, pidfd_*, mount and namespace calls, kexec, modules, bpf, perf_event_open,
  keyctl/add_key, io_uring, userfaultfd ... are refused, and so are new processes (threads only) and memory
  that the limits below do not count: memfd files, System V shared memory (``rewards/seccomp.py``).
* **Resource limits** (soft = hard): ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_CPU``, ``RLIMIT_NPROC`` (per run:
  the uid or user namespace is the run's own; threads), ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0,
  plus a wall-clock ``timeout_s`` and ``max_output_bytes`` per stream. A run being one process, its memory stays
  under ``memory_mb + tmpfs_mb`` (cgroup v2 is not used: it needs a delegated, writable cgroup tree).

A Python audit hook (sockets, process creation, writes outside the writable tmpfs, introspection) remains as an
extra layer inside; nothing rests on it.

Without bwrap the sandbox refuses to run (``SandboxUnavailable``, with install instructions) unless
``unsafe=True`` (the trainers' ``--unsafe-code-sandbox``), which runs with the older, weaker layers: rlimits, a
per-run uid as root, a best-effort network namespace, a temp dir on the host and the audit hook, and warns.
``sandbox_info()`` (``ptk check-sandbox``) says which layers are active on this machine. Threat model:
docs/sandbox.md.
"""

from __future__ import annotations

import fcntl
import functools
import grp
import json
import marshal
import math
import os
import pwd
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

from . import bwrap as _bwrap
from . import runner as _runner
from . import seccomp as _seccomp

__all__ = ["SandboxResult", "SandboxUnavailable", "run_python", "sandbox_info", "require_sandbox"]

# As root each run gets its own throwaway uid from this range: RLIMIT_NPROC is then per run and the run's files
# and processes are nobody else's. Random, and skipped when the user database (NSS) knows it.
RUN_UID_BASE, RUN_UID_SPAN = 1_000_000_000, 1_000_000_000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_MINIMAL_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
_SOURCE_NAME = "main.py"
with open(_runner.__file__, encoding="utf-8") as _f:  # passed to `python -c`: the sandbox has no ptkernels
    _RUNNER_SOURCE = _f.read()


class SandboxUnavailable(RuntimeError):
    """No OS-level sandbox on this machine (bubblewrap missing or unusable) and unsafe mode was not asked for."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None: the child could not be started; negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None  # "timeout" | "output_limit" | "signal:SIGXCPU" ... | "start_failed" | None
    reports: str = ""  # what the trusted runner reported on its own descriptor (check values, "done")

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.killed_reason is None


def _check_positive(name: str, value, *, integer: bool, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _run_uid() -> int:
    """A random uid no user or group of this machine has (asked through NSS, so LDAP/SSSD users count)."""
    for _ in range(100):
        uid = RUN_UID_BASE + secrets.randbelow(RUN_UID_SPAN)
        if not _id_in_use(uid):
            return uid
    raise RuntimeError("sandbox: no free uid found for the run")


def _id_in_use(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def _memfd(name: str, data: bytes) -> int:
    """An anonymous file holding ``data``, sealed: nobody can write, grow or shrink it any more (a child could
    otherwise reopen it writable through /proc/self/fd, whatever the descriptor it got, and grow our copy)."""
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)  # close-on-exec off only for what Popen passes (pass_fds)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def _read_only(fd: int) -> int:
    """A read-only descriptor of the same memfd, so the child cannot grow our copy."""
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    os.close(fd)
    return ro


def _kill_group(pgid: int, uid: int | None = None) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    # Anything that left the group (setpgid) or the session (setsid, run uid only) is found through /proc.
    for pid in _session_members(pgid, uid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_group_gone(pgid: int, uid: int | None, grace_s: float = 2.0) -> None:
    """SIGKILL is asynchronous and orphans are reaped by init: keep killing until nothing of the group is left, so
    a caller never sees processes of a finished run (bounded: a straggler is logged nowhere, just left to die)."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            if not _session_members(pgid, uid):
                return
        except PermissionError:
            return
        _kill_group(pgid, uid)
        time.sleep(0.01)


def _session_members(sid: int, uid: int | None = None) -> list[int]:
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp session ...
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[:1] == [b"Z"] or len(fields) < 4:
            continue
        if int(fields[2]) == sid or int(fields[3]) == sid:
            found.append(int(entry))
        elif uid is not None:
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found.append(int(entry))
            except OSError:
                pass
    return found


READ_PACING_S = 0.002  # at most one read of the child's output per this many seconds while it keeps writing


def _collect(proc: subprocess.Popen, pipes: dict, caps: dict, uid: int | None, timeout_s: float,
             legacy: bool):
    """Read every pipe with a byte cap and a wall-clock deadline; returns (bufs, timed_out, reason)."""
    bufs = {fd: bytearray() for fd in pipes.values()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    timed_out, reason, exited_at, last_read = False, None, None, -math.inf
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out, reason = True, "timeout"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                if legacy:
                    _kill_group(proc.pid, uid)  # a straggler holding our pipes open must not keep us waiting
            elif exited_at is not None and now - exited_at > 1.0:
                break
            ready = sel.select(timeout=min(deadline - now, 0.05))
            if ready and now - last_read < READ_PACING_S:  # reads in quick succession: let output pile up, so a
                time.sleep(READ_PACING_S)  # child writing one byte at a time cannot cost a wakeup (and the GIL) a byte
            if ready:
                last_read = time.monotonic()
            for key, _ in ready:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf, cap = bufs[key.fd], caps[key.fd]
                if len(buf) + len(chunk) > cap:
                    buf += chunk[: cap - len(buf)]
                    reason = "output_limit"  # kill rather than drain: a chatty loop would burn CPU until timeout
                else:
                    buf += chunk
            if reason is not None:
                break
    finally:
        sel.close()
    return bufs, timed_out, reason


def run_python(
    source: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    cpu_s: float | None = None,
    max_processes: int = 32,
    max_output_bytes: int = 1 << 20,
    max_file_bytes: int = 16 << 20,
    max_open_files: int = 64,
    tmpfs_mb: int = 32,
    stdin: str | bytes | None = None,
    job: dict | None = None,
    channel: tuple[int, int] | None = None,
    unsafe: bool = False,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run ``source`` as ``__main__`` in the sandbox (see the module docstring).

    Never raises for anything the child does; raises ``ValueError`` for bad arguments, naming the argument, and
    ``SandboxUnavailable`` when bubblewrap is missing or unusable and ``unsafe`` is False. ``cpu_s`` defaults to
    ``ceil(timeout_s) + 1`` CPU seconds. ``max_output_bytes`` caps each of stdout/stderr; going over kills the
    child (``killed_reason="output_limit"``). ``stdin`` is the child's standard input (default: empty).
    ``job`` is the runner's protocol (``rewards/runner.py``), used by the code verifier: ``{"mode": "serve"}`` or
    ``{"mode": "tests", "tests": [source, ...]}``, with ``channel`` = (read fd, write fd) of two pipes joining the
    two runs (this call takes them over and closes them once the child has them). ``audit_hook=False``
    leaves out the in-process hook (tests use it to show that the OS layers hold on their own).
    """
    if not isinstance(source, str):
        raise ValueError(f"source must be a str, got {type(source).__name__}")
    _check_positive("timeout_s", timeout_s, integer=False, minimum=0.01)
    _check_positive("memory_mb", memory_mb, integer=True, minimum=32)
    if cpu_s is None:
        cpu_s = math.ceil(timeout_s) + 1
    _check_positive("cpu_s", cpu_s, integer=False, minimum=1)
    _check_positive("max_processes", max_processes, integer=True, minimum=1)
    _check_positive("max_output_bytes", max_output_bytes, integer=True, minimum=1)
    _check_positive("max_file_bytes", max_file_bytes, integer=True, minimum=0)
    _check_positive("max_open_files", max_open_files, integer=True, minimum=8)
    _check_positive("tmpfs_mb", tmpfs_mb, integer=True, minimum=1)
    if stdin is not None and not isinstance(stdin, (str, bytes)):
        raise ValueError(f"stdin must be a str, bytes or None, got {type(stdin).__name__}")
    if job is not None and (not isinstance(job, dict) or job.get("mode") not in ("main", "serve", "tests")):
        raise ValueError(f"job must be a dict with mode main, serve or tests, got {job!r}")
    if (job is not None and job["mode"] != "main") != (channel is not None):
        raise ValueError("channel: the serve and tests jobs need one (a pair of pipe descriptors), others none")
    if channel is not None and (not isinstance(channel, tuple) or len(channel) != 2
                                or not all(isinstance(fd, int) and fd >= 0 for fd in channel)):
        raise ValueError(f"channel must be a (read fd, write fd) pair, got {channel!r}")
    limits = {
        "RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": math.ceil(cpu_s), "RLIMIT_NPROC": max_processes,
        "RLIMIT_FSIZE": max_file_bytes, "RLIMIT_NOFILE": max_open_files, "RLIMIT_CORE": 0,
    }
    data_in = stdin.encode("utf-8", "surrogateescape") if isinstance(stdin, str) else stdin
    info = sandbox_info()
    channel = list(channel) if channel is not None else None  # emptied once closed: never closed twice
    try:
        if info["isolation"] == "bubblewrap":
            return _run_bwrap(source, info, limits, timeout_s, max_output_bytes, tmpfs_mb << 20, data_in, job,
                              audit_hook, channel)
        if not unsafe:
            raise SandboxUnavailable(f"sandbox: {info['problem']}; {_bwrap.INSTALL_HINT}")
        _warn_unsafe(info["problem"])
        uid = _run_uid() if info["dropped_privileges"] else None
        return _run_legacy(source, info["python"], uid, limits, timeout_s, max_output_bytes, data_in, job,
                           audit_hook, channel)
    finally:
        _close_channel(channel)


def _close_channel(channel: list[int] | None) -> None:
    """Close our copies of the channel's descriptors (once the child holds its own, or when it never started), so
    that the other run reads end-of-file when this one ends. Empties the list: a second call closes nothing (the
    numbers may belong to another thread's descriptors by then)."""
    while channel:
        try:
            os.close(channel.pop())
        except OSError:
            pass


@functools.lru_cache(maxsize=1)
def _warn_unsafe(problem: str) -> None:
    warnings.warn(f"UNSAFE code sandbox ({problem}): model-written code runs with rlimits, a per-run uid (as root) "
                  "and a Python audit hook only, which it can escape; install bubblewrap", RuntimeWarning,
                  stacklevel=3)


def _runner_cfg(uid, limits, job_fd, report_fd, write_roots, audit_hook, legacy_unshare=0, channel=None) -> str:
    return repr({"uid": uid, "limits": limits, "job_fd": job_fd, "report_fd": report_fd,
                 "write_roots": write_roots, "audit_hook": audit_hook, "legacy_unshare": legacy_unshare,
                 "channel": channel})


def _signal_reason(returncode: int) -> str:
    try:
        return "signal:" + signal.Signals(-returncode).name
    except ValueError:
        return f"signal:{-returncode}"


def _run_bwrap(source, info, limits, timeout_s, max_output_bytes, tmpfs_bytes, data_in, job, audit_hook,
               channel=None):
    privileged = os.geteuid() == 0
    uid = _run_uid() if privileged else None
    fds = []
    try:
        source_fd = _memfd("ptk-source", source.encode("utf-8", "surrogateescape"))
        fds.append(source_fd)
        program = _seccomp.filter_program()
        seccomp_fd = _memfd("ptk-seccomp", program) if program is not None else None
        if seccomp_fd is not None:
            fds.append(seccomp_fd)
        job_fd = _memfd("ptk-job", marshal.dumps(job)) if job is not None else None
        if job_fd is not None:
            fds.append(job_fd)
        stdin_fd = _read_only(_memfd("ptk-stdin", data_in)) if data_in else subprocess.DEVNULL
        if data_in:
            fds.append(stdin_fd)
        report_r, report_w = os.pipe()
        status_r, status_w = os.pipe()
        fds += [report_r, report_w, status_r, status_w]
        write_roots = [_bwrap.WORKDIR, "/tmp", "/dev/shm"]
        python = info["python"]
        command = [python, "-I", "-S", "-B", "-c", _RUNNER_SOURCE,
                   _runner_cfg(uid, limits, job_fd, report_w, write_roots, audit_hook,
                               channel=tuple(channel) if channel else None)]
        argv = _bwrap.bwrap_argv(info["bwrap"], python, privileged=privileged, tmpfs_bytes=tmpfs_bytes,
                                 source_fd=source_fd, seccomp_fd=seccomp_fd, command=command)
        argv[1:1] = ["--json-status-fd", str(status_w)]
        passed = tuple(fd for fd in (source_fd, seccomp_fd, job_fd, report_w, status_w) if fd is not None)
        passed += tuple(channel or ())
        try:
            proc = subprocess.Popen(argv, cwd="/", env=dict(_MINIMAL_ENV), stdin=stdin_fd, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=passed, start_new_session=True)
        except OSError as e:
            return SandboxResult(None, "", f"sandbox: could not start bwrap: {e}", False, "start_failed")
        for fd in (source_fd, seccomp_fd, job_fd, report_w, status_w):
            if fd is not None:
                os.close(fd)
                fds.remove(fd)
        _close_channel(channel)
        pipes = {"out": proc.stdout.fileno(), "err": proc.stderr.fileno(), "report": report_r, "status": status_r}
        caps = {pipes["out"]: max_output_bytes, pipes["err"]: max_output_bytes, report_r: max_output_bytes,
                status_r: 1 << 16}
        try:
            bufs, timed_out, reason = _collect(proc, pipes, caps, uid, timeout_s, legacy=False)
        finally:
            _end_bwrap(proc)
        status = bytes(bufs[status_r])
        _wait_sandbox_gone(status)
        returncode = proc.returncode
        if returncode is not None and 128 < returncode <= 128 + 64:
            returncode = 128 - returncode  # bwrap reports "killed by signal n" as 128 + n
        if reason is None and returncode is not None and returncode < 0:
            reason = _signal_reason(returncode)
        return SandboxResult(returncode, bufs[pipes["out"]].decode("utf-8", "replace"),
                             bufs[pipes["err"]].decode("utf-8", "replace"), timed_out, reason,
                             bufs[report_r].decode("utf-8", "replace"))
    finally:
        for fd in fds:
            os.close(fd)


def _end_bwrap(proc: subprocess.Popen) -> None:
    """Kill bwrap (its sandboxed child dies with it: --die-with-parent, and PID-1 of the namespace takes every
    process of the run along) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.stdout.close()
    proc.stderr.close()
    proc.wait()


def _wait_sandbox_gone(status: bytes, grace_s: float = 2.0) -> None:
    """Wait (bounded) until the namespace's PID-1, known from bwrap's status, is gone: the kernel removes it only
    after every other process of the namespace, so after this no process of the run is left."""
    child = None
    for line in status.splitlines():
        try:
            child = json.loads(line).get("child-pid", child)
        except (ValueError, AttributeError):
            continue
    if not isinstance(child, int) or isinstance(child, bool) or child <= 1:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return  # reaped
        if stat[stat.rfind(b")") + 2 :][:1] in (b"Z", b"X"):
            return  # dead, waiting for its (new) parent to reap it: its namespace's processes are gone
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.002)


# ------------------------------------------------------------------------ the unsafe fallback (no bubblewrap)
def _run_legacy(source, python, uid, limits, timeout_s, max_output_bytes, data_in, job, audit_hook, channel=None):
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="ptk-sandbox-"))
    fds = []
    try:
        path = os.path.join(workdir, _SOURCE_NAME)
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(source)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(path, uid, uid)
        job_fd = _memfd("ptk-job", marshal.dumps(job)) if job is not None else None
        stdin_fd = _read_only(_memfd("ptk-stdin", data_in)) if data_in else subprocess.DEVNULL
        report_r, report_w = os.pipe()
        fds += [fd for fd in (job_fd, report_r, report_w) if fd is not None] + ([stdin_fd] if data_in else [])
        flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
        cfg = _runner_cfg(uid, limits, job_fd, report_w, [workdir], audit_hook, flags,
                          tuple(channel) if channel else None)
        passed = tuple(fd for fd in (job_fd, report_w) if fd is not None) + tuple(channel or ())
        try:
            proc = subprocess.Popen([python, "-I", "-S", "-B", "-c", _RUNNER_SOURCE, cfg], cwd=workdir,
                                    env=dict(_MINIMAL_ENV), stdin=stdin_fd, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=passed, start_new_session=True)
        except OSError as e:
            return SandboxResult(None, "", f"sandbox: could not start the child: {e}", False, "start_failed")
        os.close(report_w)
        fds.remove(report_w)
        _close_channel(channel)
        pipes = {"out": proc.stdout.fileno(), "err": proc.stderr.fileno(), "report": report_r}
        caps = dict.fromkeys(pipes.values(), max_output_bytes)
        try:
            bufs, timed_out, reason = _collect(proc, pipes, caps, uid, timeout_s, legacy=True)
        finally:
            _kill_group(proc.pid, uid)
            proc.stdout.close()
            proc.stderr.close()
            returncode = proc.wait()
            _wait_group_gone(proc.pid, uid)
        if reason is None and returncode < 0:
            reason = _signal_reason(returncode)
        return SandboxResult(returncode, bufs[pipes["out"]].decode("utf-8", "replace"),
                             bufs[pipes["err"]].decode("utf-8", "replace"), timed_out, reason,
                             bufs[report_r].decode("utf-8", "replace"))
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ what is active
_PROBE = r"""
import json, os
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({
    "uid": os.getuid(), "pid": os.getpid(), "processes": sum(e.isdigit() for e in os.listdir("/proc")),
    "interfaces": open("/proc/self/net/dev").read().count(":"),
    "seccomp": status.get("Seccomp", "").strip(), "no_new_privs": status.get("NoNewPrivs", "").strip(),
    "cap_eff": status.get("CapEff", "").strip(), "root_entries": sorted(os.listdir("/")),
    "host_tmp_hidden": not os.path.exists("/tmp/.X11-unix") and len(os.listdir("/tmp")) == 0,
}))
"""
_HOST_DIRS = {"etc", "home", "var", "run", "srv", "opt"}  # none of these may be visible in the sandbox
_PROBE_LIMITS = {"RLIMIT_AS": 256 << 20, "RLIMIT_CPU": 10, "RLIMIT_FSIZE": 1 << 20, "RLIMIT_NOFILE": 64,
                 "RLIMIT_CORE": 0}


def _probe_bwrap(bwrap: str, python: str) -> tuple[dict | None, str]:
    info = {"isolation": "bubblewrap", "bwrap": bwrap, "python": python}
    res = _run_bwrap(_PROBE, info, _PROBE_LIMITS, 15.0, 1 << 16, 1 << 20, None, None, True)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError):
        return None, (res.stderr.strip().splitlines() or ["no output"])[-1]


def _bwrap_version(bwrap: str) -> str:
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip() or "unknown"


def _interpreters() -> list[str]:
    candidates = [os.path.realpath(sys.executable)]
    for extra in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(extra) and os.path.realpath(extra) not in candidates:
            candidates.append(os.path.realpath(extra))
    return candidates


@functools.lru_cache(maxsize=1)
def sandbox_info() -> dict:
    """What this machine's sandbox enforces, found once by probing a run. Keys: ``isolation`` ("bubblewrap" or
    "none" when it is missing or unusable, see ``problem``), ``bwrap``, ``bwrap_version``, ``python`` (the
    interpreter runs use), ``run_as``, ``dropped_privileges``, ``pid_namespace``, ``network_namespace``,
    ``mount_namespace``, ``seccomp``, ``no_new_privs``, ``capabilities``, ``memory_limit``, ``problem``."""
    bwrap = _bwrap.find_bwrap()
    root = os.geteuid() == 0
    problem = "bubblewrap (bwrap) is not installed" if bwrap is None else ""
    if bwrap is not None and not {"--perms", "--json-status-fd"} <= _bwrap.bwrap_features(bwrap):
        problem, bwrap = f"{bwrap} is too old ({_bwrap_version(bwrap)}; needs 0.5 or later)", None
    if bwrap is not None:
        for python in _interpreters():
            probe, why = _probe_bwrap(bwrap, python)
            if probe is None:
                problem = f"bwrap is installed but a sandboxed run failed ({why})"
                continue
            return {
                "isolation": "bubblewrap", "bwrap": bwrap, "bwrap_version": _bwrap_version(bwrap),
                "python": python,
                "run_as": "a fresh uid per run (no groups)" if root else "your uid in a new user namespace",
                "dropped_privileges": root and probe["uid"] >= RUN_UID_BASE,
                "pid_namespace": probe["pid"] <= 3 and probe["processes"] <= 3,
                "network_namespace": probe["interfaces"] == 1,
                "mount_namespace": probe["host_tmp_hidden"] and not _HOST_DIRS & set(probe["root_entries"]),
                "seccomp": probe["seccomp"] == "2", "no_new_privs": probe["no_new_privs"] == "1",
                "capabilities": "none" if int(probe["cap_eff"] or "0", 16) == 0 else probe["cap_eff"],
                "memory_limit": ("RLIMIT_AS (memory_mb) + one tmpfs cap (tmpfs_mb) for workdir, /tmp, /dev/shm"
                                 if "--size" in _bwrap.bwrap_features(bwrap) else
                                 "RLIMIT_AS (memory_mb); the tmpfs is NOT capped (bwrap < 0.7 has no --size): files "
                                 "bounded by max_file_bytes x max_open_files"),
                "problem": "",
            }
    return _legacy_info(problem)


def _legacy_info(problem: str) -> dict:
    """The unsafe fallback's layers (only used with unsafe=True), probed like the old sandbox did."""
    info = {"isolation": "none", "bwrap": None, "bwrap_version": None, "python": _interpreters()[0],
            "run_as": "the trainer's uid", "dropped_privileges": False, "pid_namespace": False,
            "network_namespace": False, "mount_namespace": False, "seccomp": False, "no_new_privs": False,
            "capabilities": "inherited", "memory_limit": "RLIMIT_AS only (files in /tmp are not counted)",
            "problem": problem}
    probe = "import json, os\nprint(json.dumps([os.getuid(), open('/proc/self/net/dev').read().count(':')]))\n"
    uids = [_run_uid(), None] if os.geteuid() == 0 else [None]
    for uid in uids:
        for python in _interpreters() if uid is not None else _interpreters()[:1]:
            res = _run_legacy(probe, python, uid, _PROBE_LIMITS, 15.0, 4096, None, None, True)
            try:
                child_uid, interfaces = json.loads(res.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError, TypeError):
                continue
            info.update(python=python, dropped_privileges=uid is not None and child_uid == uid,
                        network_namespace=interfaces == 1,
                        run_as="a fresh uid per run" if uid is not None else "the trainer's uid")
            return info
    return info


def require_sandbox(unsafe: bool = False) -> dict:
    """``sandbox_info()`` when code can be run here; raises ``SandboxUnavailable`` (saying how to install
    bubblewrap) when the OS sandbox is missing and ``unsafe`` is False. Trainers call it before loading models."""
    info = sandbox_info()
    if info["isolation"] != "bubblewrap" and not unsafe:
        raise SandboxUnavailable(f"sandbox: {info['problem']}; {_bwrap.INSTALL_HINT}")
    return info


def main(argv=None) -> int:
    """``ptk check-sandbox``: print the isolation the code reward gets on this machine; exit 1 without it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print("usage: ptk check-sandbox\n\nProbes one sandboxed run and prints which isolation layers are active.")
        return 0
    info = sandbox_info()
    for key, value in info.items():
        print(f"{key:<20}{value}")
    if info["isolation"] != "bubblewrap":
        print(f"\nNOT ISOLATED: {_bwrap.INSTALL_HINT}", file=sys.stderr)
        return 1
    return 0
