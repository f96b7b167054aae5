"""The OS layers one by one: seccomp (table and effect), namespaces, the per-run uid, the missing-tool refusal and
the unsafe fallback."""

import ast
import os
import re

import pytest

from ptkernels.trainers.rewards import sandbox as S
from ptkernels.trainers.rewards import seccomp
from ptkernels.trainers.rewards import verifiers as V

from .marks import needs_bwrap

HEADER = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"


@pytest.mark.skipif(not os.path.exists(HEADER), reason="no kernel headers to compare with")
def test_seccomp_table_matches_the_kernel_headers():
    header = {name: int(nr) for name, nr in re.findall(r"#define __NR_(\w+) (\d+)", open(HEADER).read())}
    table = seccomp.syscall_numbers("x86_64")
    known = {name for name in table if name in header}
    assert {name: table[name] for name in known} == {name: header[name] for name in known}
    # Calls newer than this machine's headers (setxattrat: Linux 6.13) must at least not collide with older ones.
    assert all(table[name] > max(header.values()) for name in set(table) - known), set(table) - known
    assert set(seccomp.DENIED) <= set(table)


def test_seccomp_program_shape():
    program = seccomp.filter_program("x86_64")
    assert len(program) % 8 == 0 and 0 < len(program) // 8 < 4096  # struct sock_filter[], BPF_MAXINSNS
    assert seccomp.filter_program("sparc") is None


@needs_bwrap
@pytest.mark.parametrize("audit_hook", [False])
def test_denied_syscalls_fail_with_eperm(audit_hook):
    # Raw syscalls through ctypes (the audit hook is off: the filter alone must refuse them).
    table = seccomp.syscall_numbers()
    if table is None:
        pytest.skip("no seccomp table for this architecture")
    calls = {name: table[name] for name in ("ptrace", "unshare", "setns", "mount", "bpf", "perf_event_open",
                                              "keyctl", "add_key", "kexec_load", "process_vm_readv",
                                              "pidfd_open", "io_uring_setup", "userfaultfd", "fork", "vfork",
                                              "memfd_create", "memfd_secret", "shmget", "setxattr",
                                              "lsetxattr", "fsetxattr", "setxattrat", "msgget", "semget",
                                              "mq_open", "io_setup", "inotify_init", "inotify_init1",
                                              "vmsplice", "splice", "tee", "socket", "socketpair")}
    body = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"for name, nr in {calls!r}.items():\n"
        "    r = libc.syscall(nr, 0, 0, 0, 0, 0)\n"
        "    print(name, r, ctypes.get_errno())\n"
        f"print('clone_newuser', libc.syscall({table['clone']}, 0x10000000 | 17, 0, 0, 0, 0), ctypes.get_errno())\n"
        f"print('clone3', libc.syscall({table['clone3']}, 0, 0), ctypes.get_errno())\n"
        f"print('clone_process', libc.syscall({table['clone']}, 17, 0, 0, 0, 0), ctypes.get_errno())\n"
        "print('seccomp', [l for l in open('/proc/self/status') if l.startswith('Seccomp:')][0].split()[1])\n"
        # pipes keep their 64 KiB: F_SETPIPE_SZ (1031) refused, F_GETPIPE_SZ (1032) still answered
        "r, w = os.pipe()\n"
        f"print('setpipe', libc.syscall({table['fcntl']}, w, 1031, 1 << 20), ctypes.get_errno())\n"
        f"print('getpipe', libc.syscall({table['fcntl']}, w, 1032, 0))\n"
    )
    res = S.run_python(body, audit_hook=audit_hook)
    assert res.ok, res
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    for name in calls:
        assert lines[name] == "-1 1", (name, lines[name])  # EPERM
    assert lines["clone_newuser"] == "-1 1" and lines["clone3"] == "-1 38" and lines["seccomp"] == "2"
    assert lines["setpipe"] == "-1 1" and lines["getpipe"] == "65536"
    # No new processes (each would get its own RLIMIT_AS); threads (clone with CLONE_THREAD) still work.
    assert lines["clone_process"] == "-1 1"
    threads = S.run_python("import threading\nt = threading.Thread(target=print, args=('thread',))\nt.start()\n"
                           "t.join()", audit_hook=False)
    assert threads.stdout == "thread\n", threads


@needs_bwrap
def test_namespaces_and_identity():
    body = (
        "import os\n"
        "print(repr((os.getpid(), sorted(e for e in os.listdir('/proc') if e.isdigit()), os.getuid(), os.getgroups(),"
        " sorted(os.listdir('/')), os.path.exists('/usr/bin/sh'), open('/proc/self/net/dev').read().count(':'),"
        " [l.split()[1] for l in open('/proc/self/status') if l.startswith(('NoNewPrivs', 'CapEff'))])))\n"
    )
    res = S.run_python(body, audit_hook=False)
    pid, procs, uid, groups, root, has_shell, interfaces, (caps, nnp) = ast.literal_eval(res.stdout)
    assert pid <= 3 and len(procs) <= 3  # PID namespace: only the run's own processes
    assert interfaces == 1 and not has_shell and not {"etc", "home", "var", "run"} & set(root)
    assert int(caps, 16) == 0 and nnp == "1"
    if os.geteuid() == 0:
        assert uid >= S.RUN_UID_BASE and groups == []
    info = S.sandbox_info()
    assert info["pid_namespace"] and info["network_namespace"] and info["mount_namespace"] and info["no_new_privs"]
    assert info["dropped_privileges"] == (os.geteuid() == 0)


def test_run_uid_skips_ids_known_to_the_user_database(monkeypatch):
    assert S._id_in_use(0)  # root
    taken = S.RUN_UID_BASE + 5
    real_getpwuid = S.pwd.getpwuid
    monkeypatch.setattr(S.pwd, "getpwuid", lambda uid: ("ldap-user",) if uid == taken else real_getpwuid(uid))
    draws = iter([5, 5, 7])
    monkeypatch.setattr(S.secrets, "randbelow", lambda n: next(draws))
    assert S._run_uid() == S.RUN_UID_BASE + 7


def test_missing_bubblewrap_refuses_unless_unsafe(monkeypatch):
    monkeypatch.setenv("PTK_BWRAP", "")
    S.sandbox_info.cache_clear()
    S._warn_unsafe.cache_clear()
    try:
        assert S.sandbox_info()["isolation"] == "none"
        with pytest.raises(S.SandboxUnavailable, match="apt-get install -y bubblewrap"):
            S.run_python("print(1)")
        with pytest.raises(S.SandboxUnavailable, match="unsafe-code-sandbox"):
            V.code("def f(): return 1", {"tests": "assert f() == 1"})
        with pytest.raises(S.SandboxUnavailable):
            S.require_sandbox()
        with pytest.warns(RuntimeWarning, match="UNSAFE"):
            assert S.run_python("print(6 * 7)", unsafe=True).stdout == "42\n"
        from ptkernels.trainers.rewards.reward_funcs import RewardFuncs

        with pytest.raises(S.SandboxUnavailable, match="bubblewrap"):
            RewardFuncs.from_verifier("math,code").require_sandbox()  # checked before any model is loaded
        with pytest.raises(S.SandboxUnavailable, match="bubblewrap"):
            RewardFuncs("math,code").require_sandbox()  # --reward-funcs
        from ptkernels.trainers.data.rows import Row

        with pytest.raises(S.SandboxUnavailable, match="bubblewrap"):  # --verifier row: a row names code
            RewardFuncs.from_verifier("row").require_sandbox([Row({"verifier": "math,code"}, "d.jsonl:1")])
        RewardFuncs.from_verifier("math").require_sandbox()  # no code reward: no sandbox needed
        unsafe = V.get_verifier("code", unsafe_code_sandbox=True)
        assert unsafe("def f(): return 1", {"tests": "assert f() == 1"}) == 1.0
        assert unsafe("def f(): return 2", {"tests": ["assert f() == 1"]}) == 0.0
    finally:
        monkeypatch.delenv("PTK_BWRAP")
        S.sandbox_info.cache_clear()
    assert S.sandbox_info()["isolation"] in ("bubblewrap", "none")


def test_check_sandbox_command(capsys):
    from ptkernels.cli import main

    rc = main(["check-sandbox"])
    out = capsys.readouterr().out
    assert ("isolation           bubblewrap" in out) == (rc == 0)
    assert "seccomp" in out and "memory_limit" in out


@needs_bwrap
def test_stdin_copy_cannot_be_reopened_for_writing():
    """The program's stdin is the trainer's sealed anonymous file: reopening it writable through /proc/self/fd (a
    descriptor opened read-only does not stop that) and growing it must fail (the trainer's memory, not the run's)."""
    body = ("import os\ngot = []\n"
            "for how in (os.O_RDWR, os.O_WRONLY):\n"
            "    try:\n        fd = os.open('/proc/self/fd/0', how)\n"
            "        os.ftruncate(fd, 1 << 24)\n        got.append('grown')\n"
            "    except OSError as e:\n        got.append(type(e).__name__)\n"
            "print(got, len(input()))\n")
    for hook in (True, False):
        res = S.run_python(body, stdin="hello\n", audit_hook=hook)
        assert res.ok and "grown" not in res.stdout and res.stdout.endswith(" 5\n"), (hook, res)
