"""The bubblewrap (``bwrap``) command line of one sandboxed run: what the sandboxed code can see and do.

Inside: a new PID, network, mount, IPC, UTS (and, where possible, cgroup) namespace; a root file system that is
read-only and holds only the interpreter, its standard library and the shared libraries under ``/usr/lib*``
(no ``/etc``, ``/home``, ``/root``, ``/run``, ``/var``, host ``/tmp``, no shells or other programs, so no host
socket files); a fresh ``/proc`` of the PID namespace; a minimal ``/dev``; one size-capped private tmpfs holding
the working directory (``WORKDIR``), ``/tmp`` and ``/dev/shm`` (both symlinks into it, so a single cap bounds
all three). No environment but ``PATH`` and ``LC_ALL``; a new session (no terminal to inject into); the sandbox
dies with its parent; no capabilities; ``no_new_privs``; the seccomp filter of ``seccomp.py``.

As root, bwrap runs privileged (it can mount an interpreter under ``/root``) and keeps only CAP_SETUID and
CAP_SETGID for the runner, whose first act is to switch to the run's throwaway uid (which drops them). As an
ordinary user, bwrap creates a user namespace (``--unshare-user``) and forbids nested ones (``--disable-userns``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig

__all__ = ["WORKDIR", "bwrap_argv", "bwrap_features", "find_bwrap", "interpreter_mounts", "INSTALL_HINT"]

WORKDIR = "/ptk-sandbox"
INSTALL_HINT = (
    "the code sandbox needs bubblewrap: install it with `apt-get install -y bubblewrap` (Debian/Ubuntu), "
    "`dnf install bubblewrap` (Fedora) or `pacman -S bubblewrap` (Arch), then check with `ptk check-sandbox`. "
    "To run model-written code without it anyway (weaker isolation: rlimits, a per-run uid as root and a Python "
    "audit hook), pass --unsafe-code-sandbox (config key unsafe_code_sandbox: true)"
)
_LIB_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def find_bwrap() -> str | None:
    """The bwrap executable, or None. ``PTK_BWRAP`` overrides the search (a path, or empty to act as missing)."""
    override = os.environ.get("PTK_BWRAP")
    if override is not None:
        return override if override and os.access(override, os.X_OK) else None
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=4)
def bwrap_features(bwrap: str) -> frozenset[str]:
    """The optional flags this bwrap knows (older releases lack some: --size and --disable-userns came in 0.7/0.8,
    --json-status-fd in 0.5)."""
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(f for f in ("--size", "--disable-userns", "--json-status-fd", "--perms") if f in text)


@functools.lru_cache(maxsize=8)
def interpreter_mounts(python: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(read-only binds, paths to hide) for ``python``: the executable, its standard library (site-packages
    hidden) and the shared library of a ``--enable-shared`` build, when those are outside ``/usr/lib*``."""
    python = os.path.realpath(python)
    binds = [python]
    hide = []
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        stdlib = sysconfig.get_paths()["stdlib"]
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        ldlibrary = sysconfig.get_config_var("INSTSONAME") or ""
    else:  # another interpreter (the system one, as a fallback): Debian layout
        version = os.path.basename(python).removeprefix("python")
        stdlib, libdir, ldlibrary = f"/usr/lib/python{version}", "", ""
    stdlib = os.path.realpath(stdlib)
    if not stdlib.startswith(tuple(d + "/" for d in _LIB_DIRS)):
        binds.append(stdlib)
        site = os.path.join(stdlib, "site-packages")
        if os.path.isdir(site):
            hide.append(site)
    if libdir and ldlibrary and not libdir.startswith(tuple(_LIB_DIRS)):
        shared = os.path.join(libdir, ldlibrary)
        if os.path.exists(shared):
            binds.append(os.path.realpath(shared))
            if os.path.realpath(shared) != shared:
                binds.append(shared)
    return tuple(binds), tuple(hide)


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def bwrap_argv(bwrap: str, python: str, *, privileged: bool, tmpfs_bytes: int, source_fd: int,
               seccomp_fd: int | None, command: list[str]) -> list[str]:
    """The full bwrap command running ``command`` (whose first element is ``python``) in the sandbox."""
    features = bwrap_features(bwrap)
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LC_ALL", "C.UTF-8", "--cap-drop", "ALL"]
    if privileged:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user"]
        if "--disable-userns" in features:  # else the seccomp filter alone refuses new user namespaces
            argv += ["--disable-userns"]
    libs = [d for d in _LIB_DIRS if os.path.islink(d) or os.path.isdir(d)]
    binds, hide = interpreter_mounts(python)
    # Parents of the mounts are made 0755 first: bwrap would create them with a restrictive or copied mode (/root
    # is 0700), which the run's uid could not traverse.
    parents = sorted({a for p in [*binds, *libs] for a in _ancestors(p)}, key=len)
    for d in parents:
        if not d.startswith(tuple(x + "/" for x in libs)) and d not in libs:
            argv += ["--perms", "0755", "--dir", d]
    for d in libs:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        else:
            argv += ["--ro-bind", d, d]
    for path in binds:
        argv += ["--ro-bind", path, path]
    for path in hide:
        argv += ["--tmpfs", path, "--remount-ro", path]
    argv += ["--proc", "/proc", "--tmpfs", "/dev"]
    for dev in _DEVICES:
        argv += ["--dev-bind", dev, dev]
    argv += ["--symlink", "/proc/self/fd", "/dev/fd", "--symlink", "/proc/self/fd/0", "/dev/stdin",
             "--symlink", "/proc/self/fd/1", "/dev/stdout", "--symlink", "/proc/self/fd/2", "/dev/stderr"]
    # One capped tmpfs for everything writable: the working dir, /tmp and /dev/shm.
    size = ["--size", str(tmpfs_bytes)] if "--size" in features else []  # else: uncapped (sandbox_info says so)
    argv += [*size, "--perms", "1777", "--tmpfs", WORKDIR,
             "--perms", "1777", "--dir", f"{WORKDIR}/.tmp", "--perms", "1777", "--dir", f"{WORKDIR}/.shm",
             "--symlink", f"{WORKDIR}/.tmp", "/tmp", "--symlink", f"{WORKDIR}/.shm", "/dev/shm",
             "--perms", "0644", "--file", str(source_fd), f"{WORKDIR}/main.py",
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORKDIR]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--", *command]
