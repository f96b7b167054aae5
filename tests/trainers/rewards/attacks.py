"""The attacks of the code-reward threat model (docs/sandbox.md), as plain functions (no pytest, no torch) so the
same code runs in the test process (root) and in a dropped-privilege subprocess (``nobody``, see
test_attacks.py). Each takes a scratch directory that its user can write (standing for the trainer's own
files), performs the attack through the public verifier/sandbox API, and raises AssertionError when it had any
effect: a wrong solution rewarded, a file outside the sandbox changed, a process or file left behind, the
"trainer" (a victim process of the same user) harmed.
"""

import os
import socket
import subprocess
import sys
import time
import traceback
import uuid

from ptkernels.trainers.rewards import verifiers as V
from ptkernels.trainers.rewards.sandbox import run_python

HOST_SHARED = ("/tmp", "/dev/shm")


def _snapshot() -> set[str]:
    found = set()
    for d in HOST_SHARED:
        try:
            found |= {os.path.join(d, e) for e in os.listdir(d)}
        except OSError:
            pass
    return found


def _processes_mentioning(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


class Outside:
    """Checks that a run left no trace: nothing new in /tmp or /dev/shm that the run made (names carrying the
    token), no process mentioning the token, the victim process alive."""

    def __init__(self, token: str):
        self.token = token
        self.before = _snapshot()
        self.victim = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(600) # {token}-victim"])

    def check(self) -> None:
        try:
            time.sleep(0.05)
            assert self.victim.poll() is None, "the victim (standing for the trainer) was killed"
            # Only names carrying the token: bwrap runs write nothing on the host, and under pytest-xdist other
            # tests' own files (the unsafe fallback's ptk-sandbox-* work dirs) come and go meanwhile.
            new = [p for p in _snapshot() - self.before if self.token in p]
            assert not new, f"left behind on the host: {new}"
            left = [p for p in _processes_mentioning(self.token) if p != self.victim.pid]
            assert not left, f"processes left behind: {left}"
        finally:
            self.victim.kill()
            self.victim.wait()


def _zero(completion: str, tests, **kw) -> None:
    verifier = V.make_code_verifier(timeout_s=kw.pop("timeout_s", 3.0), **kw)
    got = verifier(f"```python\n{completion}\n```", {"tests": tests})
    assert got == 0.0, f"wrong code scored {got}"


# ------------------------------------------------------------------------------------------- escaping the sandbox
def kill_the_trainer(scratch: str) -> None:
    token = uuid.uuid4().hex
    out = Outside(token)
    victim = out.victim.pid
    body = (
        "import os, signal\n"
        f"for pid in (os.getppid(), {victim}, 1, -1):\n"
        "    for attack in (lambda: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL),\n"
        "                   lambda: os.kill(pid, signal.SIGKILL)):\n"
        "        try:\n            attack()\n        except Exception as e:\n            print(type(e).__name__)\n"
    )
    for hook in (True, False):
        res = run_python(body, audit_hook=hook)
        assert res.returncode is not None
    _zero(body + "\ndef f():\n    return 0\n", "assert f() == 1")
    out.check()
    assert os.getpid() and os.kill(os.getpid(), 0) is None  # we are alive


def overwrite_the_checkpoint(scratch: str) -> None:
    token = uuid.uuid4().hex
    out = Outside(token)
    ckpt = os.path.join(scratch, f"checkpoint-{token}.pt")
    with open(ckpt, "w") as f:
        f.write("weights")
    before = sorted(os.listdir(scratch))
    body = (
        "import os\n"
        f"path = {ckpt!r}\n"
        "attacks = [\n"
        "    lambda: __import__('readline').write_history_file(path),\n"
        "    lambda: __import__('sqlite3').connect(path).execute('create table t(x)'),\n"
        "    lambda: __import__('dbm.ndbm').ndbm.open(path, 'c'),\n"
        "    lambda: open(path, 'w').write('pwned'),\n"
        "    lambda: os.remove(path),\n"
        f"    lambda: open(os.path.join(os.path.dirname(path), 'new-{token}'), 'w'),\n"
        "]\n"
        "for attack in attacks:\n"
        "    try:\n        attack()\n    except BaseException as e:\n        print(type(e).__name__)\n"
    )
    for hook in (True, False):
        run_python(body, audit_hook=hook)
    _zero(body + "\ndef f():\n    return 0\n", "assert f() == 1")
    with open(ckpt) as f:
        assert f.read() == "weights", "the checkpoint was changed"
    assert sorted(os.listdir(scratch)) == before, "files appeared next to the checkpoint"
    out.check()


def daemons_and_fork_bombs(scratch: str) -> None:
    token = uuid.uuid4().hex
    out = Outside(token)
    daemon = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600) # {token}'])\n"
        "time.sleep(0.2)\n"
    )
    builtin_bypass = (
        "import _imp, os, sys\nclass Spec: name = '_posixsubprocess'\nps = _imp.create_builtin(Spec)\n"
        "if ps is not None:\n"
        f"    args = [sys.executable.encode(), b'-c', b'import time; time.sleep(600) # {token}']\n"
        "    ps.fork_exec(args, [args[0]], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(), False, True,"
        " -1, None, None, None, -1, None, False)\n"
    )
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    for body in (daemon, builtin_bypass, bomb):
        for hook in (True, False):
            run_python(body, audit_hook=hook, timeout_s=1.0, max_processes=16)
        _zero(body + "\ndef f():\n    return 0\n", "assert f() == 1", timeout_s=1.0, max_processes=16)
    out.check()


def fill_tmp_and_shm(scratch: str) -> None:
    token = uuid.uuid4().hex
    out = Outside(token)
    body = (
        "import os\nwritten = 0\n"
        f"for d in ('/tmp', '/dev/shm', '.'):\n"
        "    for i in range(48):\n"
        "        try:\n"
        f"            with open(os.path.join(d, f'{token}-{{i}}'), 'wb') as f:\n"
        "                f.write(b'x' * (8 << 20))\n"
        "            written += 8 << 20\n"
        "        except OSError:\n            break\n"
        "print(written)\n"
    )
    for hook in (True, False):
        res = run_python(body, audit_hook=hook, memory_mb=256, tmpfs_mb=32)
        assert res.ok, res
        assert int(res.stdout) <= 32 << 20, f"wrote {res.stdout} bytes past a 32 MiB tmpfs"
    _zero(body + "\ndef f():\n    return 0\n", "assert f() == 1")
    out.check()


def reach_host_sockets(scratch: str) -> None:
    token = uuid.uuid4().hex
    out = Outside(token)
    path = os.path.join(scratch, f"s-{token}")
    abstract = f"\0ptk-{token}"
    listeners = []
    for address in (path, abstract):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(address)
        s.listen(4)
        s.setblocking(False)
        listeners.append(s)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.setblocking(False)
    listeners.append(tcp)
    try:
        if os.path.exists(path):
            os.chmod(path, 0o777)
        body = (
            "import socket\n"
            f"for family, address in ((socket.AF_UNIX, {path!r}), (socket.AF_UNIX, {abstract!r}),"
            f" (socket.AF_INET, ('127.0.0.1', {tcp.getsockname()[1]}))):\n"
            "    try:\n        socket.socket(family).connect(address)\n        print('CONNECTED')\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
        )
        for hook in (True, False):
            res = run_python(body, audit_hook=hook)
            assert "CONNECTED" not in res.stdout, res
        for s in listeners:
            try:
                s.accept()
                raise AssertionError("a sandboxed run connected to a host socket")
            except BlockingIOError:
                pass
    finally:
        for s in listeners:
            s.close()
        if os.path.exists(path):
            os.unlink(path)
    out.check()


def read_secrets(scratch: str) -> None:
    token = uuid.uuid4().hex
    os.environ["PTK_TEST_SECRET"] = token
    secret_file = os.path.join(scratch, f"secret-{token}")
    with open(secret_file, "w") as f:
        f.write(token)
    try:
        body = (
            "import os\nfound = []\n"
            f"for p in ('/etc/shadow', '/etc/passwd', {secret_file!r}, '/proc/1/environ'):\n"
            "    try:\n        found.append(open(p, 'rb').read())\n    except OSError:\n        pass\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n        found.append(open(f'/proc/{pid}/environ', 'rb').read())\n"
            "    except OSError:\n        pass\n"
            "found.append(repr(dict(os.environ)).encode())\n"
            "print(b''.join(found).hex())\n"
        )
        for hook in (True, False):
            res = run_python(body, audit_hook=hook)
            assert res.ok, res
            seen = bytes.fromhex(res.stdout.strip())
            assert token.encode() not in seen, "the sandbox read the trainer's secret"
            assert b"root:" not in seen, "the sandbox read /etc/passwd or /etc/shadow"
    finally:
        del os.environ["PTK_TEST_SECRET"]
        os.unlink(secret_file)


def exhaust_host_memory(scratch: str) -> None:
    """Memory past RLIMIT_AS and the capped tmpfs: anonymous files (memfd), System V shared memory, more processes
    (each with an RLIMIT_AS of its own), also through _posixsubprocess loaded under another dotted name, extended
    attributes on the tmpfs; and machine code the program writes into the tmpfs (refused by the audit hook)."""
    token = uuid.uuid4().hex
    out = Outside(token)
    body = (
        "import os, sys\ngot = []\n"
        "try:\n    fd = os.memfd_create('x')\n    os.write(fd, b'x' * (1 << 20))\n    got.append('memfd')\n"
        "except OSError:\n    pass\n"
        "try:\n    if os.fork() == 0:\n        os._exit(0)\n    got.append('fork')\nexcept OSError:\n    pass\n"
        "try:\n    import _imp, importlib.machinery as M\n"
        "    for d in sys.path:\n"
        "        so = [f for f in (os.listdir(d) if os.path.isdir(d) else []) if f.startswith('_posixsubprocess.')]\n"
        "        if so:\n"
        "            spec = M.ModuleSpec('x._posixsubprocess', None, origin=os.path.join(d, so[0]))\n"
        "            ps = _imp.create_dynamic(spec)\n"
        "            got.append('loaded')\n"
        f"            args = [sys.executable.encode(), b'-c', b'import time; time.sleep(600) # {token}']\n"
        "            ps.fork_exec(args, [args[0]], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(), False,"
        " True, -1, None, None, None, -1, None, False)\n"
        "            got.append('spawned')\n"
        "except BaseException:\n    pass\n"
        "try:\n    import ctypes\n    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    if libc.shmget(0, 1 << 20, 0o1600) >= 0:\n        got.append('shmget')\n"
        "except BaseException:\n    pass\n"
        # extended attributes on the tmpfs: kernel memory neither limit counts
        "try:\n    open('/tmp/x', 'w').close()\n    os.setxattr('/tmp/x', 'user.a', b'x' * 4096)\n"
        "    got.append('xattr')\nexcept OSError:\n    pass\n"
        # machine code: a shared object written into the tmpfs (here a copy of one of the standard library's),
        # loaded by path, through /proc and through '..'
        "try:\n    import importlib.util as U\n"
        "    name = [m for m in ('_json', '_bisect', '_heapq', 'array', '_random', '_struct')\n"
        "            if (U.find_spec(m).origin or '').endswith('.so')][0]\n"
        "    origin = U.find_spec(name).origin\n"
        "    open('/tmp/' + name + '.so', 'wb').write(open(origin, 'rb').read())\n"
        "    up = os.path.dirname(origin) + '/..' * origin.count('/')\n"
        "    for kind, path in (('tmp', '/tmp/'), ('proc', '/proc/self/root/tmp/'), ('dots', up + '/tmp/')):\n"
        "        try:\n"
        "            _imp.create_dynamic(M.ModuleSpec(name, None, origin=path + name + '.so'))\n"
        "            got.append('native')\n"
        "        except PermissionError:\n            pass\n"
        "except BaseException as e:\n    got.append(repr(e))\n"
        "print(sorted(set(got)))\n"
    )
    for hook in (True, False):
        res = run_python(body, audit_hook=hook, timeout_s=5.0)
        assert res.ok, res
        # without the hook a shared object loads (the filter, not the hook, bounds what its code can do)
        assert res.stdout.strip() in ("[]", "['loaded']", "['native']", "['loaded', 'native']"), (
            f"hook={hook}: got past the limits: {res.stdout}")
        assert hook is False or res.stdout.strip() == "[]", f"the audit hook let machine code load: {res.stdout}"
    _zero(body + "\ndef f():\n    return 0\n", "assert f() == 1")
    out.check()


# ------------------------------------------------------------------------------------------- forging the verdict
EXPECTED = 9876543211  # what f(3) must return; no trivial program guesses it
TESTS = [  # every shape a data set uses: asserts, HumanEval's check(candidate), loops, tolerances, no assert
    "assert f(3) == 9876543211", "assert 9876543211 == f(3)",
    "def check(candidate):\n    assert candidate(3) == 9876543211\n\ncheck(f)\n",
    "for x, y in [(3, 9876543211)]:\n    assert f(x) == y\n",
    "assert f(3) == 9876543211 and f(3) == 9876543211",
    "assert all(f(x) == y for x, y in [(3, 9876543211)])",
    "import math\nassert math.isclose(f(3), 9876543211)",
    "assert abs(f(3) - 9876543211) < 0.5",
    "if f(3) != 9876543211:\n    raise AssertionError\n",
    "from math import isclose\nfor i in range(1):\n    assert isclose(f(3 + i), 9876543211)\n",
    "for got, want in zip(map(f, [3]), [9876543211]):\n    assert got == want\n",
]
# The model's program speaks the channel's protocol itself: it announces __builtins__ (every builtin and
# __import__ its own) and answers every call with 0, True or an empty tuple.
SERVE_OWN_PROTOCOL = (
    "import os, ast\n"
    "cfg = ast.literal_eval(open('/proc/self/cmdline', 'rb').read().split(b'\\0')[-2].decode())\n"
    "rfd, wfd = cfg['channel']\nbuf = [b'']\n"
    "def recv():\n"
    "    while b'\\n' not in buf[0]:\n"
    "        chunk = os.read(rfd, 65536)\n"
    "        if not chunk:\n            os._exit(0)\n"
    "        buf[0] += chunk\n"
    "    line, _, buf[0] = buf[0].partition(b'\\n')\n"
    "    return ast.literal_eval(line.decode())\n"
    "def send(o):\n    os.write(wfd, (repr(o) + '\\n').encode())\n"
    "names = ['abs', 'all', 'any', 'zip', 'range', 'enumerate', 'sorted', 'set', 'isinstance', '__import__', 'map',"
    " 'len', 'isclose']\n"
    "answers = {1: 0}\n"
    "answers.update({10 + i: (True if n in ('all', 'any', 'isinstance', 'isclose') else 0) for i, n in"
    " enumerate(names)})\n"
    "send({'f': ('ref', 1), 'abs': ('ref', 10), '__builtins__': ('dict', tuple((n, ('ref', 10 + i)) for i, n in"
    " enumerate(names)))})\n"
    "while True:\n"
    "    req = recv()\n"
    "    if req[0] == 'call':\n"
    "        send(('value', answers.get(req[1], ('tuple', ())), ()))\n"
    "    else:\n"
    "        send(('value', ('ref', 13), ()))\n"
)
FORGERS = {
    # the old harness wrote a nonce into main.py; now look for the expected value anywhere it could be
    "read_expected": (
        "import os, re\ndef f(x):\n"
        "    paths = ['/proc/self/cmdline', '/proc/self/environ', '/proc/1/cmdline', '/proc/1/environ']\n"
        "    for root in ('/ptk-sandbox', '/tmp', '/dev/shm'):\n"
        "        for dirpath, _, files in os.walk(root):\n"
        "            paths += [os.path.join(dirpath, n) for n in files if n != 'main.py']\n"
        "    for path in paths:\n"
        "        try:\n"
        "            data = open(path, 'rb').read(1 << 20)\n"
        "        except OSError:\n            continue\n"
        "        found = re.search(rb'== *([0-9]{6,})', data)\n"
        "        if found:\n            return int(found.group(1))\n"
        "    return 0\n"
    ),
    "shadow_exec_compile": (
        "import builtins\ndef f(x):\n    return 0\n"
        "builtins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n"
        "builtins.eval = lambda *a, **k: 9876543211\nexec = compile = eval = builtins.exec\n"
    ),
    "always_equal": (
        "class Anything(int):\n    def __eq__(self, other):\n        return True\n    __ne__ = lambda s, o: False\n"
        "    def __bool__(self):\n        return True\n    __hash__ = int.__hash__\n"
        "def f(x):\n    return Anything(0)\n"
    ),
    "replace_stdout": (
        "import sys, io\nclass Out(io.StringIO):\n    def write(self, s):\n"
        "        return sys.__stdout__.write(\"(0, 0, 'value', 9876543211)\\n'done'\\n\")\n"
        "sys.stdout = sys.stderr = Out()\ndef f(x):\n    return 0\n"
    ),
    "atexit_forger": (
        "import atexit, os\n"
        "def forge():\n"
        "    for fd in range(3, 64):\n"
        "        for line in (b\"(0, 0, 'value', True)\\n\", b\"(0, 1, 'value', 1)\\n\", b\"'done'\\n\"):\n"
        "            try:\n                os.write(fd, line)\n            except OSError:\n                pass\n"
        "    print('__ptk_result_0__{\"i\": 0, \"ok\": true}')\n"
        "atexit.register(forge)\ndef f(x):\n    raise SystemExit(0)\n"
    ),
    "exit_before_tests": "import os\ndef f(x):\n    return 0\nos._exit(0)\n",
    "serve_own_protocol": SERVE_OWN_PROTOCOL,
    "raise_stop_iteration": "def f(x):\n    raise StopIteration\n",
    "write_every_descriptor": (
        "import os\ndef f(x):\n    return 0\n"
        "lines = b\"'done'\\n\" + b''.join(b'(%d, \\'pass\\')\\n' % i for i in range(16))\n"
        "for fd in range(3, 64):\n    try:\n        os.write(fd, lines)\n    except OSError:\n        pass\n"
    ),
    "harness_frames": (
        "import sys\ndef f(x):\n    return 0\nframe = sys._getframe(1)\n"
        "for name in ('report', 'send'):\n"
        "    fn = frame.f_locals.get(name)\n"
        "    if fn:\n        fn('done')\n        [fn((i, 'pass')) for i in range(16)]\n"
        "fin = frame.f_locals.get('finish')\nif fin:\n    fin()\n"
    ),
    "patch_math_and_operators": (
        "import math\nclass A(int):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
        "    __hash__ = int.__hash__\n    __sub__ = lambda s, o: 0.0\n    __float__ = lambda s: 9876543211.0\n"
        "def f(x):\n    return A(0)\nmath.isclose = lambda *a, **k: True\n"
        "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.all = lambda x: True\n"
        "abs = lambda x: 0\nall = lambda x: True\n"  # top-level stand-ins for the builtins a test calls
    ),
    "exit_status_only": "import sys\ndef f(x):\n    sys.exit(0)\n",
}


def forge_verdicts(scratch: str) -> None:
    token = uuid.uuid4().hex
    out = Outside(token)
    good = "def f(x):\n    return 9876543208 + x\n"
    assert V.code(f"```python\n{good}```", {"tests": TESTS}) == 1.0  # the tests can be passed
    for name, program in FORGERS.items():
        for tests in (TESTS, TESTS[2], "\n".join(TESTS[:2] + TESTS[3:]),
                      ["assert f(3) == 9876543211"] * 2 + ["y = f(3)\nassert y == 9876543211"]):
            got = V.code(f"```python\n{program}```", {"tests": tests})
            assert got == 0.0, f"{name} scored {got} on {tests!r}"
        # stdin/stdout: the expected output never enters the sandbox either
        io_program = program + "\nprint(f(3))\n"
        got = V.code(f"```python\n{io_program}```", {"tests": [{"input": "3\n", "output": "9876543211\n"}]})
        assert got == 0.0, f"{name} scored {got} on a stdin/stdout test"
    out.check()


ALL = [kill_the_trainer, overwrite_the_checkpoint, daemons_and_fork_bombs, fill_tmp_and_shm, reach_host_sockets,
       read_secrets, exhaust_host_memory, forge_verdicts]


def main() -> None:
    """Run every attack (argv[1]: scratch dir) and print one line per attack: name, then ok or the failure."""
    scratch = sys.argv[1]
    for attack in ALL:
        try:
            attack(scratch)
            print(attack.__name__, "ok", flush=True)
        except BaseException as e:  # report, keep going: the parent test names every failure
            traceback.print_exc()
            print(attack.__name__, "FAIL", repr(e).replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
