"""Run untrusted Python (model-written code) in a locked-down child process.

``run_python(source)`` never evaluates ``source`` in the calling process; it writes it to a fresh temporary
directory and runs it in a separate interpreter. Defense in depth, from the outside in:

Enforced by the operating system (cannot be undone by the child):

* **Process isolation.** A new session and process group (``start_new_session``); on timeout, on output overflow
  and after every run the whole group is SIGKILLed (``os.killpg``) and ``/proc`` is swept for stragglers of the
  session. stdin is ``/dev/null``; the environment is empty except a minimal ``PATH`` and a UTF-8 locale; the
  interpreter runs with ``-I -S -B`` (isolated: no user site, no ``PYTHON*`` variables, no cwd on ``sys.path``,
  no ``site``, no .pyc writes).
* **Resource limits** (soft = hard, so the child cannot raise them): ``RLIMIT_AS`` (address space =
  ``memory_mb``), ``RLIMIT_CPU`` (``cpu_s``), ``RLIMIT_NPROC`` (``max_processes``), ``RLIMIT_FSIZE``
  (``max_file_bytes``), ``RLIMIT_NOFILE`` (``max_open_files``), ``RLIMIT_CORE`` = 0. Plus a wall-clock
  ``timeout_s`` and ``max_output_bytes`` per stream, read with a cap so the child cannot fill our memory.
* **Unprivileged user** when we run as root: the child switches to a fresh random uid/gid per run (in
  ``[RUN_UID_BASE, RUN_UID_BASE + RUN_UID_SPAN)``, no supplementary groups), so only world permissions apply,
  ``RLIMIT_NPROC`` is enforced (the kernel ignores it for uid 0) and counts this run alone, and after the run every
  process of that uid is killed, even one that escaped the session with ``setsid()``. The temp directory is
  chowned to that uid. Because an interpreter under ``/root`` (pyenv, conda) is not executable by others, a
  world-readable interpreter (``/usr/bin/python3`` ...) is picked by a one-time probe; if none works, the child
  stays root (with every other layer) and ``sandbox_info()`` says so.
* **No network namespace access**: the child calls ``unshare(CLONE_NEWNET)`` (root) or
  ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` (non-root) before running anything, so it sees only a down loopback
  device. If the kernel refuses, it carries on without (``sandbox_info()["network_namespace"]`` reports it).

These steps run in a small trusted bootstrap interpreter that then ``exec``s the real one, instead of a
``preexec_fn``: ``preexec_fn`` runs Python between fork and exec, which can deadlock in a multi-threaded parent
(torch starts threads), while ``start_new_session`` and ``exec`` are done safely in C.

Enforced inside the child by a ``sys.addaudithook`` hook installed before the code runs (audit hooks cannot be
removed); it raises ``PermissionError`` for:

* any ``socket.*`` event (create, connect, bind, getaddrinfo ...);
* process creation and signalling: ``os.fork``/``forkpty``/``system``/``exec``/``spawn``/``posix_spawn``,
  ``subprocess.Popen``, ``os.kill``/``killpg``; importing ``_posixsubprocess`` (whose ``fork_exec`` is not
  audited), ``ctypes``/``_ctypes`` and every ``ctypes.*`` event (raw C calls would bypass the hook). A built-in
  module can still be instantiated without an import event (``_imp.create_builtin``), so ``_posixsubprocess``
  can fork past the hook: against that, ``RLIMIT_NPROC`` and the per-run uid cleanup are the guard (as root);
* writes outside the working directory: ``open`` with a writing mode or flags, ``os.mkdir``/``rename``/
  ``remove``/``rmdir``/``truncate``/``chmod``/``chown``/``utime``/``setxattr`` ... whose path is not inside it
  (paths are normalized lexically; relative ones are taken against the working dir, so ``os.chdir`` is denied;
  ``dir_fd`` arguments and non-``str``/``bytes`` paths are refused for writes; ``os.symlink``/``os.link`` are
  denied because a link could point outside);
* inspection that could reach the hook itself: ``sys.settrace``/``setprofile``, ``sys._current_frames``,
  ``gc.get_objects``/``get_referrers``/``get_referents``.

NOT enforced (know the limits):

* It is not a VM or a container: the kernel is shared, and a kernel exploit escapes it. Reads are not
  restricted beyond file permissions (as ``nobody`` that is little; without the privilege drop the child can read
  what we can, but has no network to send it anywhere).
* Python audit hooks are documented as *not* a security boundary: a CPython bug could bypass them. They are the
  second layer here; the OS layers above hold on their own when running as root.
* Without root, ``RLIMIT_NPROC`` counts every process of our uid (the hook is the main fork guard there), and a
  network namespace needs unprivileged user namespaces.
* Code and its tests share one process, so adversarial code can in principle tamper with the test harness (see
  ``verifiers.code``). The sandbox protects the machine, not the reward's integrity against introspection.
* ``RLIMIT_AS`` limits address space, not resident memory; thread creation also counts against
  ``RLIMIT_NPROC``, which is per uid and therefore shared by concurrent sandboxes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["SandboxResult", "run_python", "sandbox_info"]

# As root each run gets its own throwaway uid from this range (no passwd entry needed): RLIMIT_NPROC is then per
# run, not shared by concurrent sandboxes, and every process of that uid can be killed afterwards, including one
# that left the session with setsid(). Random, so two trainer processes are very unlikely to pick the same one.
RUN_UID_BASE, RUN_UID_SPAN = 1_000_000_000, 1_000_000_000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_MINIMAL_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
_SOURCE_NAME = "main.py"


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None: the child could not be started; negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None  # "timeout" | "output_limit" | "signal:SIGXCPU" ... | "start_failed" | None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.killed_reason is None


# Trusted bootstrap, run as `python -I -S -B -c _BOOTSTRAP CONFIG_JSON`: namespace, privileges, limits, exec.
_BOOTSTRAP = r"""
import json, os, sys, resource
cfg = json.loads(sys.argv[1])
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare(cfg["unshare_flags"])  # failure (EPERM, old kernel) = no network namespace; the hook still applies
except Exception:
    pass
uid = cfg["uid"]
if uid is not None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        sys.exit(126)
# After setuid: RLIMIT_NPROC is checked at setuid time against the current (root) limit, so setting it afterwards
# keeps exec from failing when other sandboxes already run as the same user.
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
os.execv(cfg["python"], [cfg["python"], "-I", "-S", "-B", "-c", cfg["runner"], cfg["workdir"]])
"""

# Trusted runner: installs the audit hook, then runs main.py as __main__. Everything the hook uses is bound in its
# closure/defaults at install time, so user code that patches builtins or os cannot change its decisions.
_RUNNER = r"""
import os, sys

def _install(workdir):
    _type, _str, _bytes, _int, _err = type, str, bytes, int, PermissionError
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    ok_dir_fd = (None, -1, -100)  # "no dir_fd" as the audit events report it (-100 = AT_FDCWD)
    deny_exact = frozenset((
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "os.chdir", "os.chroot", "os.symlink", "os.link",
        "sys.settrace", "sys.setprofile", "sys._current_frames",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    ))
    deny_imports = frozenset(("_posixsubprocess", "ctypes", "_ctypes"))
    # event -> (indexes of path arguments, indexes of dir_fd arguments)
    path_events = {
        "os.mkdir": ((0,), (2,)), "os.rename": ((0, 1), (2, 3)), "os.remove": ((0,), (1,)),
        "os.rmdir": ((0,), (1,)), "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)),
        "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()),
        "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
        "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)),
    }

    def inside(p):
        if _type(p) is _bytes:
            p = p.decode("utf-8", "surrogateescape")
        if _type(p) is not _str:  # str subclasses / PathLike could answer differently on the real call
            return False
        if not p.startswith("/"):
            p = workdir + "/" + p
        parts = []
        for seg in p.split("/"):
            if seg == "" or seg == ".":
                continue
            if seg == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(seg)
        norm = "/" + "/".join(parts)
        return norm == workdir or norm.startswith(workdir + "/")

    def hook(event, args):
        if event in deny_exact or event.startswith("socket.") or event.startswith("ctypes."):
            raise _err("sandbox: " + event + " is not allowed")
        if event == "import":
            if args[0] in deny_imports:
                raise _err("sandbox: import " + args[0] + " is not allowed")
        elif event == "open":
            path, mode, flags = args
            if _type(path) is _int:
                return  # wrapping an already-open descriptor
            writing = (_type(flags) is _int and flags & wflags) or (_type(mode) is _str and (
                "w" in mode or "a" in mode or "x" in mode or "+" in mode))
            if not writing:
                return
            # os.open (mode None) may carry a dir_fd the event does not show: demand an absolute path there.
            if mode is None and not ((_type(path) is _str and path.startswith("/")) or
                                     (_type(path) is _bytes and path.startswith(b"/"))):
                raise _err("sandbox: os.open for writing needs an absolute path")
            if not inside(path):
                raise _err("sandbox: writing outside the working directory is not allowed")
        elif event in path_events:
            paths, fds = path_events[event]
            for i in fds:
                if i < len(args) and args[i] not in ok_dir_fd:
                    raise _err("sandbox: dir_fd is not allowed for " + event)
            for i in paths:
                if event == "os.truncate" and _type(args[i]) is _int:
                    continue  # ftruncate needs a descriptor opened for writing, which open already vetted
                if not inside(args[i]):
                    raise _err("sandbox: " + event + " outside the working directory is not allowed")

    sys.addaudithook(hook)

_install(os.path.realpath(sys.argv[1]))
del _install
with open(__SOURCE__, "rb") as _f:
    _code = compile(_f.read(), __SOURCE__, "exec")
_main = type(sys)("__main__")
_main.__file__ = __SOURCE__
sys.modules["__main__"] = _main
sys.argv = [__SOURCE__]
del _f
exec(_code, _main.__dict__)
""".replace("__SOURCE__", repr(_SOURCE_NAME))


def _check_positive(name: str, value, *, integer: bool, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _unshare_flags() -> int:
    return _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET


def _spawn(python: str, workdir: str, uid: int | None, limits: dict[str, int]) -> subprocess.Popen:
    cfg = {"python": python, "workdir": workdir, "uid": uid, "limits": limits, "runner": _RUNNER,
           "unshare_flags": _unshare_flags()}
    return subprocess.Popen(
        [python, "-I", "-S", "-B", "-c", _BOOTSTRAP, json.dumps(cfg)],
        cwd=workdir, env=dict(_MINIMAL_ENV), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
    )


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


def _collect(proc: subprocess.Popen, uid: int | None, timeout_s: float, max_output_bytes: int):
    """Read both pipes with a byte cap and a wall-clock deadline; returns (stdout, stderr, timed_out, reason)."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for pipe in bufs:
        sel.register(pipe, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    timed_out, reason, exited_at = False, None, None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out, reason = True, "timeout"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                _kill_group(proc.pid, uid)  # a straggler holding our pipes open must not keep us waiting
            elif exited_at is not None and now - exited_at > 1.0:
                break
            for key, _ in sel.select(timeout=min(deadline - now, 0.05)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                if len(buf) + len(chunk) > max_output_bytes:
                    buf += chunk[: max_output_bytes - len(buf)]
                    reason = "output_limit"  # kill rather than drain: a chatty loop would burn CPU until timeout
                else:
                    buf += chunk
            if reason is not None:
                break
    finally:
        sel.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), timed_out, reason


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
) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a sandboxed interpreter (see the module docstring).

    Never raises for anything the child does; raises ``ValueError`` for bad arguments, naming the argument.
    ``cpu_s`` defaults to ``ceil(timeout_s) + 1`` CPU seconds. ``max_output_bytes`` caps each of stdout/stderr;
    going over kills the child (``killed_reason="output_limit"``).
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
    info = sandbox_info()
    limits = {
        "RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": math.ceil(cpu_s), "RLIMIT_NPROC": max_processes,
        "RLIMIT_FSIZE": max_file_bytes, "RLIMIT_NOFILE": max_open_files, "RLIMIT_CORE": 0,
    }
    uid = _run_uid() if info["dropped_privileges"] else None
    return _run(source, info["python"], uid, limits, timeout_s, max_output_bytes)


def _run_uid() -> int:
    return RUN_UID_BASE + secrets.randbelow(RUN_UID_SPAN)


def _run(source, python, uid, limits, timeout_s, max_output_bytes) -> SandboxResult:
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="ptk-sandbox-"))
    try:
        path = os.path.join(workdir, _SOURCE_NAME)
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(source)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(path, uid, uid)
        try:
            proc = _spawn(python, workdir, uid, limits)
        except OSError as e:
            return SandboxResult(None, "", f"sandbox: could not start the child: {e}", False, "start_failed")
        try:
            out, err, timed_out, reason = _collect(proc, uid, timeout_s, max_output_bytes)
        finally:
            _kill_group(proc.pid, uid)
            proc.stdout.close()
            proc.stderr.close()
            returncode = proc.wait()
            _wait_group_gone(proc.pid, uid)
        if reason is None and returncode < 0:
            try:
                reason = "signal:" + signal.Signals(-returncode).name
            except ValueError:
                reason = f"signal:{-returncode}"
        return SandboxResult(returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                             timed_out, reason)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_PROBE = "import json, math, os\nprint(json.dumps([os.getuid(), open('/proc/self/net/dev').read().count(':')]))\n"
_PROBE_LIMITS = {"RLIMIT_AS": 256 << 20, "RLIMIT_CPU": 10, "RLIMIT_FSIZE": 1 << 20, "RLIMIT_NOFILE": 64,
                 "RLIMIT_CORE": 0}


@functools.lru_cache(maxsize=1)
def sandbox_info() -> dict:
    """What this machine's sandbox enforces, found once by probing: ``{"python", "dropped_privileges",
    "network_namespace"}``. As root it picks the first interpreter that works as an unprivileged uid."""
    candidates = [os.path.realpath(sys.executable)]
    for extra in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(extra) and os.path.realpath(extra) not in candidates:
            candidates.append(os.path.realpath(extra))
    uids = [_run_uid(), None] if os.geteuid() == 0 else [None]
    for uid in uids:
        for python in candidates if uid is not None else candidates[:1]:
            res = _run(_PROBE, python, uid, _PROBE_LIMITS, 15.0, 4096)
            try:
                child_uid, interfaces = json.loads(res.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError, TypeError):
                continue
            return {"python": python, "dropped_privileges": uid is not None and child_uid == uid,
                    "network_namespace": interfaces == 1}
    return {"python": candidates[0], "dropped_privileges": False, "network_namespace": False}
