"""The trusted first code of every sandboxed run (its source is passed to ``python -I -S -B -c``; never imported).

It runs inside the sandbox, in this order: read its configuration (``argv[1]``, a Python literal the trainer
wrote), drop to the per-run uid when started as root, set the resource limits (soft = hard, so they cannot be
raised), read the job from an inherited descriptor, install the audit hook (an extra layer: the operating system's
namespaces, seccomp filter and limits are what the sandbox rests on), then one of three jobs:

* ``main``: run the model's ``main.py`` as ``__main__``, nothing else (``run_python``; stdin/stdout tests);
* ``serve``: run the model's ``main.py``, then answer requests from the test process on the channel (two
  inherited pipe descriptors): call a function of the model, read an attribute, iterate, ``len``, index. Every
  answer is plain data (``_encoder``: exact built-in types, so nothing with a custom ``__eq__`` crosses) or a
  reference to an object that stays here;
* ``tests``: no model code at all. Run each test's source with genuine builtins, the model's top-level names
  bound to the values or references the serving process announced (``Remote``: calls, attributes, iteration
  and indexing go over the channel; comparing, hashing or testing the truth of a reference raises; a test's own
  function passed in a call runs here when the model's code calls it), and report ``(test, "pass")`` on its own
  descriptor for each test that finished without raising.

So the model's code and the tests never share a process: every comparison, ``assert`` and builtin a test uses
runs where the model cannot reach it, on plain data parsed with ``ast.literal_eval``; the expected values never
enter the model's sandbox, and what the model's process writes can only be the values it answers with.

Startup cost matters (one run per completion): the job arrives in ``marshal`` form (trusted: the trainer wrote
it); the serving process parses requests with a builtins-free ``eval`` (they come from the test process, and
the serving process is the model's own anyway), the test process parses answers with ``ast.literal_eval``.
Everything the harness calls is bound before the model's code runs, so shadowing ``exec``/``compile`` or patching
modules does not change what the serving harness does.
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


def _path_checks(write_roots):
    """The audit hook's two path tests, bound at install time: ``inside(path)`` (under ``write_roots``, resolved
    lexically from the working directory) and ``native_ok(path)`` (an extension module the interpreter may load)."""
    _type, _str, _bytes = type, str, bytes
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

    # Extension modules only from the interpreter's own read-only folders, named plainly: never from the tmpfs
    # (a program can write a shared object there), /proc (/proc/self/fd/N, /proc/self/cwd reach it) or via "..".
    native_dirs = tuple(d.rstrip("/") + "/" for d in sys.path
                        if _type(d) is _str and d.startswith("/") and not d.startswith("/proc") and not inside(d))

    def native_ok(p):
        if _type(p) is not _str or "/./" in p or "/../" in p or p.endswith(("/.", "/..")) or "//" in p:
            return False
        if inside(p):
            return False
        for d in native_dirs:
            if p.startswith(d):
                return True
        return False

    return inside, native_ok


def _audit_hook(write_roots):
    """A hook raising PermissionError for sockets, process creation and signals, writes outside ``write_roots``
    and introspection that could reach the hook. Everything it uses is bound here, at install time."""
    _type, _str, _bytes, _int, _len, _err = type, str, bytes, int, len, PermissionError
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
    inside, native_ok = _path_checks(write_roots)

    def hook(event, args):
        if event in deny_exact or event.startswith("socket.") or event.startswith("ctypes."):
            raise _err("sandbox: " + event + " is not allowed")
        if event == "import":
            # the last component: _imp.create_dynamic loads _posixsubprocess as "x._posixsubprocess" as well
            name, filename = args[0], args[1]
            base = filename.rpartition("/")[2].partition(".")[0] if _type(filename) is _str else ""
            if (_type(name) is not _str or name.rpartition(".")[2] in deny_imports or base in deny_imports):
                raise _err("sandbox: import " + _str(name) + " is not allowed")
            if filename is not None and not native_ok(filename):  # an extension module: machine code
                raise _err("sandbox: loading machine code from " + _str(filename) + " is not allowed")
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
                if i < _len(args) and args[i] not in ok_dir_fd:
                    raise _err("sandbox: dir_fd is not allowed for " + event)
            for i in paths:
                if event == "os.truncate" and _type(args[i]) is _int:
                    continue  # ftruncate needs a descriptor opened for writing, which open already vetted
                if not inside(args[i]):
                    raise _err("sandbox: " + event + " outside the working directory is not allowed")

    sys.addaudithook(hook)


_BUILTIN_TYPES = (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset, type(None), range,
                  bytearray)


def _encoder(ref=None):
    """value -> nested tuples of str/int/bool/None tags that ``repr`` writes and ``ast.literal_eval`` reads back
    (``_decoder``): built-in values, ranges, the built-in types themselves, and by value ``Fraction``, ``Decimal``
    and named tuples (rebuilt on the other side from its own classes). A subclass of a built-in type crosses as
    its plain value (never with its own ``__eq__``). Anything else becomes ``ref(x)`` (a ``("ref", n)`` tag)
    when ``ref`` is given, else raises TypeError."""
    _type, _frepr, _tuple, _items, _str, _getattr = type, float.__repr__, tuple, dict.items, str, getattr
    plain = (type(None), bool, int, str)
    types = {t: t.__name__ for t in _BUILTIN_TYPES}
    # A subclass's own __eq__ must not cross, but its value may: read through the base type's own slots.
    subclass_values = (
        (int, int.__int__), (float, float.__float__), (str, str.__str__), (bytes, bytes), (bytearray, bytes),
        (complex, complex),
        (list, lambda x: list(list.__iter__(x))), (tuple, lambda x: tuple(tuple.__iter__(x))),
        (dict, lambda x: dict(dict.items(x))), (frozenset, lambda x: frozenset(frozenset.__iter__(x))),
        (set, lambda x: set(set.__iter__(x))),
    )

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
            return (t.__name__, _tuple(enc(v, depth + 1) for v in x))
        if t is dict:
            return ("dict", _tuple((enc(k, depth + 1), enc(v, depth + 1)) for k, v in _items(x)))
        if t is range:
            return ("range", x.start, x.stop, x.step)
        if t is type and x in types:  # a built-in type itself: `int` passed as an argument
            return ("type", types[x])
        fields = _getattr(t, "_fields", None) if isinstance(x, tuple) else None
        if _type(fields) is tuple and all(_type(f) is _str for f in fields):  # a named tuple: .x works there too
            return ("namedtuple", _str(t.__name__), fields, _tuple(enc(v, depth + 1) for v in tuple.__iter__(x)))
        module = _getattr(t, "__module__", None)
        if module == "fractions" and t.__name__ == "Fraction":
            return ("fraction", int.__int__(x.numerator), int.__int__(x.denominator))
        if module in ("decimal", "_decimal", "_pydecimal") and t.__name__ == "Decimal":
            return ("decimal", _str(x))
        for base, plain_value in subclass_values:  # Counter, namedtuple, IntEnum ...: their plain value
            if isinstance(x, base):
                return enc(plain_value(x), depth + 1)
        if ref is not None:
            return ref(x)
        raise TypeError("not plain data: " + t.__name__)

    return enc


def _decoder(ref, callback=None):
    """The inverse of ``_encoder``: nested tags -> values, ``("ref", n)`` -> ``ref(n)``, ``("callback", n)`` ->
    ``callback(n)`` where one is given; raises ValueError on anything else (a message from the other process is
    data, never code)."""
    _type, _float, _str, _int = type, float, str, int
    kinds = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
    types = {t.__name__: t for t in _BUILTIN_TYPES}
    named = {}  # (name, fields) -> this side's namedtuple class

    def dec(x, depth=0):
        if depth > 100:
            raise ValueError("nested too deeply")
        t = _type(x)
        if x is None or t is bool or t is _int or t is _str:
            return x
        if t is not tuple or not x or _type(x[0]) is not _str:
            raise ValueError("not an encoded value")
        tag, n = x[0], len(x)
        if tag == "float" and n == 2 and _type(x[1]) is _str:
            return _float(x[1])
        if tag == "complex" and n == 3 and _type(x[1]) is _str and _type(x[2]) is _str:
            return complex(_float(x[1]), _float(x[2]))
        if tag == "bytes" and n == 2 and _type(x[1]) is _str:
            return bytes.fromhex(x[1])
        if tag in kinds and n == 2 and _type(x[1]) is tuple:
            return kinds[tag](dec(v, depth + 1) for v in x[1])
        if tag == "dict" and n == 2 and _type(x[1]) is tuple:
            out = {}
            for pair in x[1]:
                if _type(pair) is not tuple or len(pair) != 2:
                    raise ValueError("not an encoded dict item")
                out[dec(pair[0], depth + 1)] = dec(pair[1], depth + 1)
            return out
        if tag == "range" and n == 4 and all(_type(v) is _int for v in x[1:]):
            return range(x[1], x[2], x[3])
        if tag == "type" and n == 2 and x[1] in types:
            return types[x[1]]
        if (tag == "namedtuple" and n == 4 and _type(x[1]) is _str and _type(x[2]) is tuple
                and _type(x[3]) is tuple and len(x[2]) == len(x[3]) and all(_type(f) is _str for f in x[2])):
            key = (x[1], x[2])
            if key not in named:
                named[key] = __import__("collections").namedtuple(x[1], x[2], rename=True)
            return named[key](*(dec(v, depth + 1) for v in x[3]))
        if tag == "fraction" and n == 3 and _type(x[1]) is _int and _type(x[2]) is _int and x[2] != 0:
            return __import__("fractions").Fraction(x[1], x[2])
        if tag == "decimal" and n == 2 and _type(x[1]) is _str and len(x[1]) < 10_000:
            return __import__("decimal").Decimal(x[1])
        if tag == "ref" and n == 2 and _type(x[1]) is _int:
            return ref(x[1])
        if tag == "callback" and n == 2 and _type(x[1]) is _int and callback is not None:
            return callback(x[1])
        raise ValueError("not an encoded value")

    return dec


def _channel(fds, parse):
    """(send(obj), receive() -> obj) over two pipe descriptors, one ``repr`` line per message (``repr`` escapes
    newlines inside strings). ``receive`` raises EOFError when the other process is gone."""
    read_fd, write_fd = fds
    _read, _write, _repr = os.read, os.write, repr
    pending = [b""]

    def send(obj):
        data = (_repr(obj) + "\n").encode("utf-8", "surrogatepass")
        while data:
            data = data[_write(write_fd, data):]

    def receive():
        parts, chunk = [pending[0]], pending[0]
        while b"\n" not in chunk:
            chunk = _read(read_fd, 1 << 16)
            if not chunk:
                raise EOFError("the other sandboxed process is gone")
            parts.append(chunk)
        line, _, pending[0] = b"".join(parts).partition(b"\n")
        return parse(line.decode("utf-8", "surrogatepass"))

    return send, receive


def _serve(g, fds, finish):
    """Answer the test process's requests about the model's globals ``g`` until it closes the channel."""
    _type, _len, _iter, _next, _getattr, _base_exc, _str = type, len, iter, next, getattr, BaseException, str
    _tuple, _list, _dict, _set = tuple, list, dict, set
    objects = {}

    def ref(x):
        n = _len(objects) + 1
        objects[n] = x
        return ("ref", n)

    enc = _encoder(ref)
    send, receive = _channel(fds, lambda line: eval(line, {"__builtins__": {}}))  # the test process's own repr

    def callback(n):
        """A function of the test passed to the model's code: calling it asks the tests' process to run it
        (requests of the tests' process meanwhile, from inside it, are answered in turn)."""
        def call(*args, **kwargs):
            send(("callback", n, enc(args), enc(kwargs)))
            while True:
                answer = next_message()
                if answer[0] == "value":
                    return dec(answer[1])
                if answer[0] == "error":
                    raise RuntimeError("the test's function raised " + _str(answer[1]) + ": " + _str(answer[2]))
                send(handle(answer))
        return call

    dec = _decoder(lambda n: objects[n], callback)

    def next_message():
        try:
            return receive()
        except EOFError:
            finish()

    def handle(request):
        op, target = request[0], objects.get(request[1])
        try:
            if op == "call":
                args, kwargs = dec(request[2]), dec(request[3])
                value = target(*args, **kwargs)
                # in-place changes to list/dict/set arguments go back too (a test may check them)
                changed = _tuple((i, enc(a)) for i, a in enumerate(args) if _type(a) in (_list, _dict, _set))
                return ("value", enc(value), changed)
            if op == "getattr":
                return ("value", enc(_getattr(target, request[2])), ())
            if op == "iter":
                return ("value", enc(_iter(target)), ())
            if op == "next":
                try:
                    value = _next(target)
                except StopIteration:
                    return ("stop",)
                return ("value", enc(value), ())
            if op == "len":
                return ("value", enc(_len(target)), ())
            if op == "bool":
                return ("value", enc(not not target), ())
            if op == "getitem":
                return ("value", enc(target[dec(request[2])]), ())
            return ("error", "TypeError", "unknown request")
        except _base_exc as e:
            try:
                args = e.args
                message = args[0] if len(args) == 1 and _type(args[0]) is _str else _str(e)
                message = message[:200]
                ancestry = _tuple(_str(c.__name__) for c in _type(e).__mro__ if c is not object)
            except _base_exc:
                message, ancestry = "", ()
            return ("error", _type(e).__name__, message, ancestry)

    send(_announce(g, enc, ref))
    while True:
        send(handle(next_message()))


def _announce(g, enc, ref):
    """The model's top-level names for the tests' process: plain values, references, modules by name (the tests
    import their own copy) and exception classes by ancestry (the tests make stand-ins)."""
    _type, _str, _getattr, _tuple, _base_exc = type, str, getattr, tuple, BaseException
    module = _type(sys)
    names = {}
    for k, v in list(g.items()):
        if _type(k) is not _str or k.startswith("__"):
            continue
        if _type(v) is module:
            names[k] = ("module", _getattr(v, "__name__", ""))
            continue
        if isinstance(v, type) and issubclass(v, BaseException):
            names[k] = ("exception", _tuple(_str(c.__name__) for c in v.__mro__ if c is not object))
            continue
        try:
            names[k] = enc(v)
        except _base_exc:  # nested too deeply: a reference instead
            names[k] = ref(v)
    return names


class RemoteError(Exception):
    """In the tests' process: an exception of the model's code whose class the tests cannot name (its type name
    and message only)."""


def _asker(send, receive, decode, encode_reply, exceptions):
    """``ask(*request, callbacks=None) -> (value, changed)``: one request to the serving process and its answer,
    decoded; the test's functions of ``callbacks`` run here when the serving process calls them meanwhile.
    ``exceptions``: name -> the class an error of that name is raised as here (built-in exceptions, and the
    stand-ins made for the model's own exception classes)."""

    def run_callback(message, callbacks):
        fn = callbacks.get(message[1]) if len(message) == 4 and type(message[1]) is int else None
        try:
            if fn is None:
                raise TypeError("no such function of the test")
            return ("value", encode_reply(fn(*decode(message[2]), **decode(message[3]))), ())
        except BaseException as e:
            return ("error", type(e).__name__, str(e)[:200])

    def ask(*request, callbacks=None):
        send(request)
        while True:
            answer = receive()
            if type(answer) is tuple and answer and answer[0] == "callback":
                send(run_callback(answer, callbacks or {}))
                continue
            break
        if type(answer) is not tuple or not answer:
            raise RemoteError("malformed answer")
        if answer[0] == "stop":
            if request[0] != "next":  # StopIteration out of a call would end the test's own map()/zip() early
                raise RemoteError("StopIteration")
            raise StopIteration
        if answer[0] == "error" and len(answer) >= 3 and type(answer[1]) is str and type(answer[2]) is str:
            raise _as_exception(answer, exceptions)
        if answer[0] != "value" or len(answer) != 3 or type(answer[2]) is not tuple:
            raise RemoteError("malformed answer")
        return decode(answer[1]), answer[2]

    return ask


def _as_exception(answer, exceptions):
    """An error answer as the nearest class of its ancestry the tests know: a built-in one (a test may expect
    ValueError; JSONDecodeError is one) or a stand-in; never SystemExit & co. (the test's own exit decides),
    never StopIteration."""
    ancestry = answer[3] if len(answer) == 4 and type(answer[3]) is tuple else (answer[1],)
    for name in ancestry:
        cls = exceptions.get(name) if type(name) is str else None
        if cls is None:
            continue
        if issubclass(cls, Exception) and not issubclass(cls, (StopIteration, StopAsyncIteration)):
            try:
                return cls(answer[2])
            except TypeError:  # a constructor that wants more than a message
                pass
        break
    return RemoteError(answer[1] + ": " + answer[2])


# Builtins that would run or reach code by name: never callable from the model's code, even when a test passes
# one (eval("...") in the tests' process could write a verdict).
_UNSAFE_CALLBACKS = ("eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars", "getattr",
                     "setattr", "delattr", "breakpoint", "input", "type", "object", "super", "memoryview")


def _refuse(op):
    def method(self, *args):
        raise TypeError(op + " on an object of the model's code: tests compare plain data (int, float, str, bytes, "
                        "list, tuple, dict, set, None) only")
    return method


def _update(target, new):
    """The model's in-place change to a list/dict/set argument, applied to the test's own object."""
    t = type(target)
    if t is list and type(new) is list:
        target[:] = new
    elif (t is dict and type(new) is dict) or (t is set and type(new) is set):
        target.clear()
        target.update(new)


def _remote_class(ask, decode):
    """(``Remote``, ``encode``): the test process's stand-in for an object of the model's code (see the module
    docstring), and the encoder of plain data and Remotes (what a test's function hands back, an index)."""
    unsafe = {id(getattr(builtins, n)) for n in _UNSAFE_CALLBACKS if hasattr(builtins, n)}

    class Remote:
        __slots__ = ("_ref",)

        def __init__(self, ref):
            object.__setattr__(self, "_ref", ref)

        def __call__(self, *args, **kwargs):
            callbacks = {}  # the test's own functions among the arguments: callable from the model's code, here

            def ref_or_callback(x):
                if type(x) is not Remote and callable(x) and id(x) not in unsafe:
                    callbacks[len(callbacks) + 1] = x
                    return ("callback", len(callbacks))
                return _remote_ref(x)

            encode = _encoder(ref_or_callback)
            value, changed = ask("call", self._ref, encode(args), encode(kwargs), callbacks=callbacks)
            for i, new in changed:  # the model's in-place changes to list/dict/set arguments
                if type(i) is int and 0 <= i < len(args):
                    _update(args[i], decode(new))
            return value

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return ask("getattr", self._ref, name)[0]

        def __iter__(self):
            it = ask("iter", self._ref)[0]
            if type(it) is not Remote:
                raise TypeError("iter() of an object of the model's code returned plain data")
            return it

        def __next__(self):
            return ask("next", self._ref)[0]

        def __len__(self):
            n = ask("len", self._ref)[0]
            if type(n) is not int or n < 0:
                raise TypeError("len() of an object of the model's code is not a non-negative int")
            return n

        def __getitem__(self, key):
            return ask("getitem", self._ref, encode(key))[0]

        def __repr__(self):
            return "<object of the model's code #" + str(self._ref) + ">"

        __setattr__ = __delattr__ = _refuse("setting attributes")
        def __bool__(self):  # the model's own answer, as in one process (`while node:`); it could return True anyway
            value = ask("bool", self._ref)[0]
            if type(value) is not bool:
                raise TypeError("bool() of an object of the model's code is not a bool")
            return value

        __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse("comparing")
        __hash__ = _refuse("hashing")
        __contains__ = _refuse("'in'")

    def _remote_ref(x):
        if type(x) is Remote:
            return ("ref", x._ref)
        raise TypeError("only plain data, the test's functions and objects of the model's code can be passed to the "
                        "model's code, not " + type(x).__name__)

    encode = _encoder(_remote_ref)
    return Remote, encode


# standard modules whose import does something (prints, opens a browser, starts Tk): never imported for the model
_NOISY_MODULES = frozenset(("this", "antigravity", "__hello__", "__phello__", "idlelib", "tkinter", "turtle",
                            "turtledemo", "webbrowser"))


def _standard_module(name):
    """This process's own copy of a standard-library module, or None (another module, or one the hook refuses)."""
    if (type(name) is not str or name.partition(".")[0] not in sys.stdlib_module_names
            or name.partition(".")[0] in _NOISY_MODULES or "__main__" in name.split(".")):
        return None
    try:
        __import__(name)
        return sys.modules[name]
    except BaseException:
        return None


class _Redefined:
    """Bound in the tests' process where the model's code defined a name that a builtin or a standard module has:
    any use fails the test. Neither the builtin (which would answer for a model that defines `pow` wrongly) nor
    the model's object (`abs = lambda x: 0` would answer a test's tolerance check) may stand there."""

    __slots__ = ("_name",)

    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def _refuse(self, *args, **kwargs):
        raise TypeError("the program redefines " + self._name + ", a name of Python's own; a test cannot tell "
                        "which one it means")

    __call__ = __getattr__ = __getitem__ = __iter__ = __len__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = \
        __ge__ = __bool__ = __hash__ = __contains__ = __add__ = __sub__ = __mul__ = __index__ = _refuse


def _run_defined_tests(scope, before, called):
    """What pytest and unittest would collect of a test source and run: the top-level ``test*`` functions and
    ``Test*`` classes it defined (not in ``before``) and does not call itself (``called``). Returns how many ran.
    Something named like a test that cannot be run here (fixtures, a generator) fails: it must not pass unrun."""
    ran = 0
    for name, obj in list(scope.items()):
        if id(obj) in before or name in called:
            continue
        if name.startswith("test") and callable(obj) and not isinstance(obj, type):
            _run_test_function(obj, name)
            ran += 1
        elif isinstance(obj, type) and obj.__module__ == "__main__" and (name.startswith("Test") or _is_case(obj)):
            ran += _run_test_class(obj, name)
    return ran


def _is_case(cls):
    unittest = sys.modules.get("unittest")
    return unittest is not None and issubclass(cls, unittest.TestCase)


def _run_test_function(fn, name):
    import inspect

    inner = inspect.unwrap(fn)
    inner = inner.__func__ if inspect.ismethod(inner) else inner
    if not inspect.isfunction(inner) or inspect.isgeneratorfunction(inner) or inspect.isasyncgenfunction(inner):
        raise TypeError(f"{name}: a test this harness cannot run")
    required = [p for p in inspect.signature(fn).parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise TypeError(f"{name} takes {', '.join(p.name for p in required)} (pytest fixtures are not available)")
    result = fn()
    if inspect.iscoroutine(result):  # driven here: asyncio's event loop wants a socket pair, which is refused
        for _ in range(1_000_000):
            try:
                result.send(None)
            except StopIteration:
                return
        raise TimeoutError(f"{name}: the coroutine kept waiting (no event loop here)")


def _run_test_class(cls, name):
    """A unittest.TestCase, or pytest's plain ``Test*`` class (an instance per ``test*`` method, its
    setup_method/teardown_method around it). Returns how many tests ran."""
    if _is_case(cls):
        unittest = sys.modules["unittest"]
        result = unittest.TestResult()
        unittest.defaultTestLoader.loadTestsFromTestCase(cls).run(result)
        if not result.wasSuccessful():
            raise AssertionError(f"{name}: {len(result.failures)} failed, {len(result.errors)} errors")
        return result.testsRun
    methods = [m for m in dir(cls) if m.startswith("test") and callable(getattr(cls, m))]
    if methods and "__init__" in cls.__dict__:
        raise TypeError(f"{name} has an __init__: pytest would not collect it")
    for method in methods:
        instance = cls()
        if hasattr(instance, "setup_method"):
            instance.setup_method(getattr(instance, method))
        try:
            _run_test_function(getattr(instance, method), f"{name}.{method}")
        finally:
            if hasattr(instance, "teardown_method"):
                instance.teardown_method(getattr(instance, method))
    return len(methods)


def _run_tests(sources, fds, report, finish, pristine):
    """The ``tests`` job: the tests in order in one ``__main__`` module (so ``unittest.main()`` finds its cases),
    with genuine builtins and the model's names as announced; verdicts reported."""
    import ast
    import keyword

    pristine = dict(pristine, exit=sys.exit, quit=sys.exit)  # -S leaves them undefined; tests call exit()
    send, receive = _channel(fds, ast.literal_eval)
    exceptions = {k: v for k, v in pristine.items() if isinstance(v, type) and issubclass(v, BaseException)}
    codec = {}
    ask = _asker(send, receive, lambda v: codec["dec"](v), lambda v: codec["enc"](v), exceptions)
    Remote, codec["enc"] = _remote_class(ask, lambda v: codec["dec"](v))
    codec["dec"] = _decoder(Remote)
    try:
        announced = receive()
        if type(announced) is not dict or not all(type(k) is str for k in announced):
            raise ValueError("malformed list of names")
    except BaseException as e:  # the model's code failed before serving (or never started): nothing passes
        report(("error", type(e).__name__))
        finish()
    # Only public identifiers (never __builtins__, which would hand every builtin lookup to the model); a name a
    # builtin or a standard module has is _Redefined, unless it is the model's `import math` (the tests' own copy).
    shadowing = set(pristine) | set(sys.stdlib_module_names)
    bound, model_exceptions = {}, {}
    for name, encoded in announced.items():
        if not name.isidentifier() or name.startswith("_") or keyword.iskeyword(name):
            continue
        tagged = type(encoded) is tuple and len(encoded) == 2
        if tagged and encoded[0] == "module" and (name not in shadowing or name == encoded[1]):
            module = _standard_module(encoded[1])
            if module is not None:
                bound[name] = module
        elif name in shadowing:
            bound[name] = _Redefined(name)
        elif tagged and encoded[0] == "exception" and type(encoded[1]) is tuple and encoded[1]:
            model_exceptions[name] = encoded[1]
        else:
            try:
                bound[name] = codec["dec"](encoded)
            except ValueError:
                pass
    # Stand-ins for the model's exception classes (bases first): a test's `except ModelError` catches them.
    for name, ancestry in sorted(model_exceptions.items(), key=lambda item: len(item[1])):
        if not all(type(a) is str for a in ancestry):
            continue
        base = next((exceptions[a] for a in ancestry[1:] if a in exceptions), Exception)
        if not issubclass(base, Exception):
            base = Exception
        try:
            exceptions[ancestry[0]] = bound[name] = type(ancestry[0], (base,), {})
        except TypeError:  # a base that cannot be subclassed
            continue
    main = type(sys)("__main__")
    solution = type(sys)("solution")  # `from solution import f`, as some data sets write their tests
    solution.__dict__.update(bound)
    sys.modules["__main__"], sys.modules["solution"] = main, solution
    sys.argv = ["tests.py"]  # unittest.main() reads its options from it
    scope = main.__dict__
    scope.update(bound)
    scope["__builtins__"] = pristine  # last: nothing announced can replace it
    for ti, source in enumerate(sources):  # in turn, sharing one module, as in one file
        try:
            tree = ast.parse(source)
            called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            before = {id(v): v for v in scope.values()}  # holding them: no new object takes their ids
            try:
                exec(compile(tree, f"<test {ti}>", "exec"), scope)
                stopped = False
            except SystemExit:  # unittest.main() ends so: whatever its status, the cases are judged below
                stopped = True
            if not _run_defined_tests(scope, before, called) and stopped:
                raise AssertionError("the test exited before any check ran")
        except BaseException as e:
            report((ti, "fail", type(e).__name__))
            continue
        report((ti, "pass"))
    finish()


def main():
    cfg = eval(sys.argv[1], {"__builtins__": {}})  # the trainer's own literal, not model output
    if cfg.get("legacy_unshare"):
        _legacy_unshare(cfg["legacy_unshare"])
    if cfg.get("uid") is not None:
        _drop_privileges(cfg["uid"])
    os.environ.pop("PWD", None)  # bwrap sets it; the environment is PATH and LC_ALL only
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # an answer may be a large int (repr and literal_eval both convert it)
    for name, value in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    job = {"mode": "main"}
    if cfg.get("job_fd") is not None:
        with os.fdopen(cfg["job_fd"], "rb") as f:
            job = marshal.loads(f.read())
    report_fd, channel = cfg.get("report_fd"), cfg.get("channel")
    # Bound now: the model's code may shadow or patch any name after this point.
    _exec, _compile, _write, _repr = builtins.exec, builtins.compile, os.write, repr
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

    def report(obj):
        if report_fd is not None:
            data = (_repr(obj) + "\n").encode("utf-8", "surrogatepass")
            while data:
                data = data[_write(report_fd, data):]

    builtins.exit = builtins.quit = sys.exit  # -S leaves them undefined; solutions call exit()
    if cfg.get("audit_hook", True):
        _audit_hook(cfg["write_roots"])
    mode = job["mode"]
    del cfg
    if mode == "tests":  # trusted test code only: the model's code runs in the serving process
        _run_tests(job["tests"], channel, report, finish, pristine_builtins)
    source_name = "main.py"
    with open(source_name, "rb") as f:
        code = _compile(f.read(), source_name, "exec")
    module = _type(sys)("__main__")
    module.__file__ = source_name
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [source_name]
    del f
    g = module.__dict__
    if mode == "main":
        _exec(code, g)
        return
    try:
        _exec(code, g)
    except _base_exc as e:
        _print_exc(_type(e), e, e.__traceback__)
        os._exit(1)
    _serve(g, channel, finish)


if __name__ == "__main__":
    main()
