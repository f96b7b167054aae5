"""The trusted first code of every sandboxed run (its source is passed to ``python -I -S -B -c``; never imported).

It runs inside the sandbox, before the model's code, in this order: read its configuration (``argv[1]``, a
Python literal the trainer wrote),
drop to the per-run uid when started as root, set the resource limits (soft = hard, so they cannot be raised),
read the job from an inherited descriptor, install the audit hook (an extra layer: the operating system's
namespaces, seccomp filter and limits are what the sandbox rests on), then run the model's ``main.py``:

* ``main``: as ``__main__``, nothing else (``run_python``; stdin/stdout tests);
* ``checks``: then, for each test, its statements in order: setup statements are executed, check expressions
  are evaluated and their values written to the report descriptor as plain data, one Python literal per line
  that the trainer reads with ``ast.literal_eval`` (exact built-in types only: an object with a custom ``__eq__``
  cannot be encoded, so it cannot cross). The expected values never enter the sandbox: the trainer compares;
* ``script``: then the test source; ``done`` is reported only when it finished without raising (tests the
  splitter cannot parse).

Startup cost matters (one run per completion and test): no ``json``/``re`` imports; the job arrives in
``marshal`` form (trusted: the trainer wrote it). Everything the harness calls is bound here before the
model's code runs, so shadowing ``exec``/``compile`` or patching modules does not change what the harness does
(and in ``checks`` mode a forged report is harmless: it would have to contain the expected values, which the
sandbox never sees).
"""

import builtins
import marshal
import os
import resource
import sys


def _drop_privileges(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
        os._exit(126)


def _legacy_unshare(flags):
    # Only without bubblewrap (--unsafe-code-sandbox): a network namespace from the child itself, best effort.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).unshare(flags)
    except Exception:
        pass


def _audit_hook(write_roots):
    """A hook raising PermissionError for sockets, process creation and signals, writes outside ``write_roots``
    and introspection that could reach the hook. Everything it uses is bound here, at install time."""
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
    path_events = {  # event -> (indexes of path arguments, indexes of dir_fd arguments)
        "os.mkdir": ((0,), (2,)), "os.rename": ((0, 1), (2, 3)), "os.remove": ((0,), (1,)),
        "os.rmdir": ((0,), (1,)), "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)),
        "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()),
        "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
        "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)),
    }
    workdir = write_roots[0]
    roots = tuple(write_roots)

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
        for root in roots:
            if norm == root or norm.startswith(root + "/"):
                return True
        return False

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


def _encoder():
    """value -> nested tuples of str/int/bool/None tags that ``repr`` writes and ``ast.literal_eval`` reads back
    (``rewards/code_tests.decode``). Exact built-in types only: subclasses are refused, since they could answer
    ``==`` as they like."""
    _type, _frepr = type, float.__repr__
    plain = (type(None), bool, int, str)

    def enc(x, depth=0):
        if depth > 100:
            raise ValueError("nested too deeply")
        t = _type(x)
        if t in plain:
            return x
        if t is float:
            return ("float", _frepr(x))  # repr round-trips exactly, nan and inf included
        if t is complex:
            return ("complex", _frepr(x.real), _frepr(x.imag))
        if t is bytes:
            return ("bytes", bytes.hex(x))
        if t is list or t is tuple or t is set or t is frozenset:
            return (t.__name__, tuple(enc(v, depth + 1) for v in x))
        if t is dict:
            return ("dict", tuple((enc(k, depth + 1), enc(v, depth + 1)) for k, v in dict.items(x)))
        raise TypeError("not plain data: " + t.__name__)

    return enc


def main():
    cfg = eval(sys.argv[1], {"__builtins__": {}})  # the trainer's own literal, not model output
    if cfg.get("legacy_unshare"):
        _legacy_unshare(cfg["legacy_unshare"])
    if cfg.get("uid") is not None:
        _drop_privileges(cfg["uid"])
    os.environ.pop("PWD", None)  # bwrap sets it; the environment is PATH and LC_ALL only
    for name, value in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    job = {"mode": "main"}
    if cfg.get("job_fd") is not None:
        with os.fdopen(cfg["job_fd"], "rb") as f:
            job = marshal.loads(f.read())
    report_fd = cfg.get("report_fd")
    # Bound now: the model's code may shadow or patch any name after this point.
    _exec, _eval, _compile, _write, _repr = builtins.exec, builtins.eval, builtins.compile, os.write, repr
    _type, _base_exc, _print_exc = type, BaseException, sys.excepthook
    streams = (sys.stdout, sys.stderr)

    def finish():  # skip atexit handlers and lingering threads of the model's code: the verdict is in
        for stream in streams:
            try:
                stream.flush()
            except _base_exc:
                pass
        os._exit(0)

    pristine_builtins = dict(builtins.__dict__)
    enc = _encoder()

    def report(obj):
        if report_fd is not None:
            data = (_repr(obj) + "\n").encode("utf-8", "surrogatepass")
            while data:
                data = data[_write(report_fd, data):]

    builtins.exit = builtins.quit = sys.exit  # -S leaves them undefined; solutions call exit()
    if cfg.get("audit_hook", True):
        _audit_hook(cfg["write_roots"])
    source_name = "main.py"
    with open(source_name, "rb") as f:
        code = _compile(f.read(), source_name, "exec")
    module = _type(sys)("__main__")
    module.__file__ = source_name
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [source_name]
    del f, cfg
    g = module.__dict__
    mode = job["mode"]
    if mode == "main":
        _exec(code, g)
        return
    try:
        _exec(code, g)
    except _base_exc as e:
        _print_exc(_type(e), e, e.__traceback__)
        os._exit(1)
    if mode == "script":
        try:
            _exec(_compile(job["source"], "<tests>", "exec"), g)
        except _base_exc as e:
            _print_exc(_type(e), e, e.__traceback__)
            os._exit(1)
        report("done")
        finish()
    # checks: names in a check expression resolve to the model's globals, builtins to the originals.
    check_globals = dict(g)
    for ti, statements in enumerate(job["tests"]):
        for si, (kind, src) in enumerate(statements):
            try:
                if kind == "exec":
                    _exec(_compile(src, f"<test {ti}>", "exec"), g)
                    continue
                check_globals.clear()
                check_globals.update(g)
                check_globals["__builtins__"] = pristine_builtins
                value = enc(_eval(_compile(src, f"<test {ti}>", "eval"), check_globals))
                report((ti, si, "value", value))
            except _base_exc as e:
                report((ti, si, "error", _type(e).__name__))
                break
    finish()


if __name__ == "__main__":
    main()
