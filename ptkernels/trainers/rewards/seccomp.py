"""A seccomp filter for the code sandbox, as the classic-BPF program ``bwrap --seccomp FD`` loads.

bubblewrap takes a compiled filter (what ``seccomp_export_bpf`` writes); libseccomp's Python bindings are not
importable from a pip/pyenv interpreter, and the program is small, so it is assembled here, readably: a deny-list
on top of the namespaces and the dropped privileges. Every denied call answers ``EPERM`` (``clone3``: ``ENOSYS``,
so the C library falls back to ``clone``, whose flags a filter can read); a call from another ABI (x32, i386)
kills the process, since its numbers mean other calls.

Memory is bounded by ``RLIMIT_AS`` per address space and by the capped tmpfs, so the filter closes the ways
around both: new processes (``fork``, ``vfork``, ``clone`` without ``CLONE_THREAD``: each would get its own
``RLIMIT_AS``; threads share one), anonymous files (``memfd_create``, ``memfd_secret``: shared memory counted by
neither limit) and System V shared memory (``shmget``: a segment keeps its pages after it is detached).

Only x86-64 has a table (the numbers differ per architecture); elsewhere ``filter_program()`` is ``None`` and
``sandbox_info()`` reports that no seccomp filter is active.
"""

from __future__ import annotations

import functools
import platform
import struct

__all__ = ["DENIED", "DENIED_CLONE_FLAGS", "REQUIRED_CLONE_FLAGS", "filter_program", "syscall_numbers"]

# Calls the sandboxed code never needs and the kernel's most attacked or most powerful interfaces: debugging and
# reading other processes, mounts and namespaces, kernel modules and kexec, eBPF and perf, the kernel keyring,
# io_uring, userfaultfd, handles that bypass path permissions, process fds, clock and host settings. Then what
# holds kernel memory that neither RLIMIT_AS nor the tmpfs cap counts (extended attributes on the tmpfs, System V
# message queues and semaphores, POSIX message queues) or uses a quota the whole host or user shares (the
# asynchronous I/O contexts of fs.aio-max-nr, inotify instances), or pins memory outside the address space
# (pages spliced into pipes: vmsplice of a huge page kept 2 MiB per 4 KiB; socket buffers, up to net.core.wmem_max
# each): native code loaded from the tmpfs reaches any call left open, so this list, not the audit hook, is what
# bounds it. fcntl(F_SETPIPE_SZ) is refused too (pipes keep their 64 KiB; 1 MiB each filled ~28 MiB at 64 files).
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "mount_setattr",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "quotactl", "quotactl_fd",
    "swapon", "swapoff", "acct", "syslog", "uselib", "vhangup", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "fanotify_init",
    "fork", "vfork", "memfd_create", "memfd_secret", "shmget",
    "setxattr", "lsetxattr", "fsetxattr", "setxattrat", "msgget", "semget", "mq_open",
    "io_setup", "inotify_init", "inotify_init1",
    "vmsplice", "splice", "tee", "socket", "socketpair",
)
F_SETPIPE_SZ = 1031  # fcntl's command (linux/fcntl.h: F_LINUX_SPECIFIC_BASE + 7)
# clone() may not make namespaces: NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET.
DENIED_CLONE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
# ... and it must make a thread (CLONE_THREAD), not a process.
REQUIRED_CLONE_FLAGS = 0x00010000

_X86_64 = {  # from asm/unistd_64.h (tests compare this table with the header when it is installed)
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "process_madvise": 440, "kcmp": 312,
    "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "mount_setattr": 442, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
    "kexec_file_load": 320, "reboot": 169, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "keyctl": 250, "add_key": 248,
    "request_key": 249, "open_by_handle_at": 304, "name_to_handle_at": 303, "lookup_dcookie": 212,
    "quotactl": 179, "quotactl_fd": 443, "swapon": 167, "swapoff": 168, "acct": 163, "syslog": 103,
    "uselib": 134, "vhangup": 153, "iopl": 172, "ioperm": 173, "settimeofday": 164, "clock_settime": 227,
    "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170, "setdomainname": 171, "fanotify_init": 300,
    "fork": 57, "vfork": 58, "memfd_create": 319, "memfd_secret": 447, "shmget": 29,
    "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "setxattrat": 463, "msgget": 68, "semget": 64,
    "mq_open": 240, "io_setup": 206, "inotify_init": 253, "inotify_init1": 294,
    "vmsplice": 278, "splice": 275, "tee": 276, "socket": 41, "socketpair": 53, "fcntl": 72,
    "clone": 56, "clone3": 435,
}
_ARCHES = {"x86_64": (0xC000003E, _X86_64, 0x40000000)}  # machine -> (AUDIT_ARCH, table, x32 syscall bit)

# Classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_EPERM, _ENOSYS = 1, 38
_NR, _ARCH, _ARG0_LO, _ARG1_LO = 0, 4, 16, 24  # offsets in struct seccomp_data (little-endian: low words first)


def syscall_numbers(machine: str | None = None) -> dict[str, int] | None:
    arch = _ARCHES.get(machine or platform.machine())
    return None if arch is None else dict(arch[1])


@functools.lru_cache(maxsize=4)
def filter_program(machine: str | None = None) -> bytes | None:
    """The filter as ``struct sock_filter[]`` bytes, or None where this architecture has no table."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    audit_arch, table, abi_bit = arch
    # Instructions as (code, jump-if-true label, jump-if-false label, k); labels resolve to forward offsets.
    prog: list[tuple[int, str | None, str | None, int]] = [
        (_LD_ABS_W, None, None, _ARCH),
        (_JEQ, None, "kill", audit_arch),
        (_LD_ABS_W, None, None, _NR),
        (_JGE, "kill", None, abi_bit),
        (_JEQ, "clone", None, table["clone"]),
        (_JEQ, "enosys", None, table["clone3"]),
        (_JEQ, "fcntl", None, table["fcntl"]),
    ]
    prog += [(_JEQ, "deny", None, table[name]) for name in DENIED]
    labels = {"allow": len(prog)}
    prog.append((_RET, None, None, _RET_ALLOW))
    labels["clone"] = len(prog)
    prog += [(_LD_ABS_W, None, None, _ARG0_LO), (_JSET, "deny", None, DENIED_CLONE_FLAGS),
             (_JSET, "allow_clone", "deny", REQUIRED_CLONE_FLAGS)]
    labels["allow_clone"] = len(prog)
    prog.append((_RET, None, None, _RET_ALLOW))
    labels["fcntl"] = len(prog)  # the kernel reads the command as an unsigned int: its low word
    prog += [(_LD_ABS_W, None, None, _ARG1_LO), (_JEQ, "deny", "allow_fcntl", F_SETPIPE_SZ)]
    labels["allow_fcntl"] = len(prog)
    prog.append((_RET, None, None, _RET_ALLOW))
    labels["deny"] = len(prog)
    prog.append((_RET, None, None, _RET_ERRNO | _EPERM))
    labels["enosys"] = len(prog)
    prog.append((_RET, None, None, _RET_ERRNO | _ENOSYS))
    labels["kill"] = len(prog)
    prog.append((_RET, None, None, _RET_KILL_PROCESS))

    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        offsets = [0 if label is None else labels[label] - i - 1 for label in (jt, jf)]
        if not all(0 <= o <= 255 for o in offsets):
            raise AssertionError("seccomp: jump out of range")  # a bug in the table above, not a runtime state
        out += struct.pack("<HBBI", code, offsets[0], offsets[1], k)
    return bytes(out)
