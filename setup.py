"""Build script: the optional native extension ``ptkernels._C`` (csrc/), compiled through ninja.

Everything installable lives in pyproject.toml; this file only declares the extension and how to build it. The
package itself is pure Python + Triton: when the extension cannot be built, ``pip install`` still succeeds
with a warning, ``import ptkernels`` works, and ``ptkernels.backends()`` leaves out "native".

The build needs no PyTorch (build isolation would otherwise pull a CUDA wheel): the module talks to tensors through
data pointers (csrc/module.cpp), so it needs only a C++17 compiler, pybind11's headers and the ``ninja`` binary,
the latter two from [build-system] requires. setup.py writes ``build.ninja`` into the build folder and runs ninja:
parallel, incremental (header dependencies tracked), and the commands are visible in that file.

Environment knobs (all optional):
    CXX                  the C++ compiler (default: c++)
    PTK_NATIVE_ARCH      "native" (default: -march=native, the extension is built on the machine that runs it),
                         "none" (no -march flag: portable), or any -march value, e.g. "x86-64-v3"
    PTK_OPENMP           "0": no OpenMP threads (the loops are still vectorized with -fopenmp-simd)
    PTK_CXXFLAGS         extra flags for the C++ compiler
    PTK_BUILD_CUDA       "0": never build the CUDA kernels; "1": build them (fails loudly without nvcc);
                         unset: build them when nvcc is found and an installed torch is a CUDA build
    PTK_CUDA_ARCHS       compute capabilities for nvcc (default "80;90")
    CUDA_HOME            the CUDA toolkit (default: /usr/local/cuda, else the nvcc on PATH)
    MAX_JOBS             ninja's parallel jobs
    PTK_REQUIRE_NATIVE   "1": a failed build fails the install instead of warning

``python setup.py build_ext --inplace`` builds ptkernels/_C*.so in the source tree (PYTHONPATH=. then finds it); there
a failed build is an error (exit status 1, saying what is missing), not a warning.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _quote(args) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _ninja_binary() -> str | None:
    try:
        import ninja  # the PyPI package ships the binary

        exe = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(exe):
            return exe
    except ImportError:
        pass
    return shutil.which("ninja")


def _pybind11_include() -> str:
    import pybind11

    return pybind11.get_include()


def _find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, /usr/local/cuda/bin, then PATH (as tests/ops/backends/test_cuda_compile.py looks)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_lib_dir(nvcc: str) -> str:
    """The toolkit's library folder (libcudart): next to the real nvcc (PATH may hold a wrapper script)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib")):
            d = os.path.join(home, sub)
            if glob.glob(os.path.join(d, "libcudart*")):
                return d
    raise RuntimeError(f"libcudart not found for {nvcc} (set CUDA_HOME)")


def _torch_is_cuda_build() -> bool:
    """An installed torch with CUDA, asked in a subprocess (never imported into the build process)."""
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda or '')"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() not in ("", "None")


def _cuda_plan():
    """(nvcc, cudart folder, sources) when the CUDA part is to be built, else None; raises when asked and
    impossible."""
    flag = os.environ.get("PTK_BUILD_CUDA", "").strip()
    if flag == "0":
        return None
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    nvcc = _find_nvcc()
    if flag == "1":
        if nvcc is None:
            raise RuntimeError("PTK_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if not sources:
            raise RuntimeError("PTK_BUILD_CUDA=1 but csrc/cuda/ has no .cu sources")
    elif nvcc is None or not sources or not _torch_is_cuda_build():
        return None
    return nvcc, _cuda_lib_dir(nvcc), sources


def _arch_flags(arch: str) -> list[str]:
    if arch in ("", "none", "0"):
        return []
    return [f"-march={arch}"]


class NinjaBuildExt(build_ext):
    """Builds the one extension ``ptkernels._C`` with ninja; a failure is a warning (the extension is optional)."""

    def build_extension(self, ext: Extension) -> None:
        try:
            self._build(ext)
        except Exception as exc:  # noqa: BLE001 - any failure: the pure-Python package must still install
            if os.environ.get("PTK_REQUIRE_NATIVE", "0") == "1":
                raise
            if "build_ext" in sys.argv[1:]:
                # `python setup.py build_ext --inplace` asks for exactly this extension: building nothing and
                # exiting 0 would read as success. (pip's builds run bdist_wheel / editable_wheel and only warn.)
                raise SystemExit(f"error: ptkernels: the native extension {ext.name} was not built: {exc}. It needs "
                                 "a C++17 compiler (CXX), pybind11 and ninja: pip install pybind11 ninja "
                                 "(or pip install -e '.[dev]')") from exc
            msg = (f"ptkernels: the native extension {ext.name} was not built ({exc}). ptkernels still works; "
                   "backend='native' is unavailable and backend='auto' uses the PyTorch / Triton paths. "
                   "Needs a C++17 compiler (CXX), pybind11 and ninja.")
            warnings.warn(msg, stacklevel=1)
            print(f"WARNING: {msg}", file=sys.stderr)

    def copy_extensions_to_source(self) -> None:
        """--inplace / editable: copy what was built (a failed optional build leaves nothing) into the tree,
        atomically (a temporary file, then a rename), so a process that has the old module loaded keeps working."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            fullname = self.get_ext_fullname(ext.name)
            filename = self.get_ext_filename(fullname)
            package_dir = build_py.get_package_dir(".".join(fullname.split(".")[:-1]))
            inplace_file = os.path.join(package_dir, os.path.basename(filename))
            regular_file = os.path.join(self.build_lib, filename)
            if not os.path.exists(regular_file):
                continue
            tmp = inplace_file + ".tmp"
            shutil.copyfile(regular_file, tmp)
            shutil.copymode(regular_file, tmp)
            os.replace(tmp, inplace_file)
            print(f"copied {regular_file} -> {inplace_file}", file=sys.stderr)

    def get_outputs(self):
        return [p for p in super().get_outputs() if os.path.exists(p)]

    # ------------------------------------------------------------------------------------------ the build

    def _build(self, ext: Extension) -> None:
        ninja = _ninja_binary()
        if ninja is None:
            raise RuntimeError("the ninja binary was not found (pip install ninja)")
        try:
            _pybind11_include()
        except ImportError:
            raise RuntimeError("pybind11 is not installed (pip install pybind11)") from None
        output = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(output), exist_ok=True)
        build_dir = os.path.abspath(os.path.join(self.build_temp, "ptk_native"))
        os.makedirs(build_dir, exist_ok=True)
        cuda = _cuda_plan()
        arch = os.environ.get("PTK_NATIVE_ARCH", "native").strip()
        attempts = [arch] if arch in ("", "none", "0") else [arch, "none"]  # a compiler without -march=X
        last_error = None
        for a in attempts:
            try:
                self._run_ninja(ninja, build_dir, output, ext.sources, _arch_flags(a), cuda)
                return
            except subprocess.CalledProcessError as exc:
                last_error = exc
                print(f"ptkernels: native build with PTK_NATIVE_ARCH={a or 'none'} failed", file=sys.stderr)
        raise RuntimeError(f"compiling csrc/ failed (see the compiler output above): {last_error}")

    def _run_ninja(self, ninja, build_dir, output, sources, arch_flags, cuda) -> None:
        cxx = os.environ.get("CXX", "c++")
        openmp = os.environ.get("PTK_OPENMP", "1") != "0"
        includes = [f"-I{sysconfig.get_paths()['include']}", f"-I{_pybind11_include()}", f"-I{CSRC}"]
        cxxflags = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra",
                    # no errno / FP-trap semantics: lets GCC if-convert and vectorize the exp loops (NaN and inf
                    # propagate exactly as before; only FP exception flags and errno are given up)
                    "-fno-math-errno", "-fno-trapping-math",
                    "-fopenmp" if openmp else "-fopenmp-simd", *arch_flags, *includes]
        cxxflags += shlex.split(os.environ.get("PTK_CXXFLAGS", ""))
        ldflags = ["-shared"] + (["-fopenmp"] if openmp else [])
        if sys.platform == "darwin":
            ldflags += ["-undefined", "dynamic_lookup"]
        nvcc_line = ""
        cu_objects = []
        if cuda is not None:
            nvcc, lib_dir, cu_sources = cuda
            cxxflags.append("-DPTK_WITH_CUDA")
            archs = [a.strip() for a in os.environ.get("PTK_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
                     if a.strip()]
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            nvccflags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                         "--expt-relaxed-constexpr", "-lineinfo", f"-I{CSRC}", *gencode]
            nvcc_line = f"nvcc = {_quote([nvcc])}\nnvccflags = {_quote(nvccflags)}\n"
            static = os.path.exists(os.path.join(lib_dir, "libcudart_static.a"))
            ldflags += [f"-L{lib_dir}"] + (["-lcudart_static", "-ldl", "-lrt", "-lpthread"] if static
                                           else ["-lcudart", f"-Wl,-rpath,{lib_dir}"])
            cu_objects = [(s, os.path.join(build_dir, "cuda", os.path.basename(s) + ".o")) for s in cu_sources]

        lines = [
            "# generated by setup.py (ptkernels native extension); rerun the build instead of editing",
            "ninja_required_version = 1.3",
            f"cxx = {_quote([cxx])}",
            f"cxxflags = {_quote(cxxflags)}",
            f"ldflags = {_quote(ldflags)}",
            nvcc_line,
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cxxflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
            "",
            "rule nvcc",
            "  command = $nvcc --generate-dependencies-with-compile --dependency-output $out.d $nvccflags -c $in "
            "-o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = NVCC $in",
            "",
            "rule link",
            "  command = $cxx $in -o $out $ldflags",
            "  description = LINK $out",
            "",
        ]
        objects = []
        for src in sources:
            src = os.path.join(ROOT, src)
            rel = os.path.relpath(src, CSRC).replace(os.sep, "_")
            obj = os.path.join(build_dir, rel + ".o")
            objects.append(obj)
            lines.append(f"build {_ninja_escape(obj)}: cxx {_ninja_escape(src)}")
        for src, obj in cu_objects:
            objects.append(obj)
            lines.append(f"build {_ninja_escape(obj)}: nvcc {_ninja_escape(src)}")
        lines.append(f"build {_ninja_escape(output)}: link {' '.join(_ninja_escape(o) for o in objects)}")
        lines.append(f"default {_ninja_escape(output)}")
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        cmd = [ninja, "-C", build_dir]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        print(f"ptkernels: building {os.path.basename(output)} with ninja in {build_dir}"
              f"{' (with CUDA)' if cuda else ''}", file=sys.stderr)
        subprocess.run(cmd, check=True)


CPU_SOURCES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))

setup(
    ext_modules=[Extension("ptkernels._C", sources=["csrc/module.cpp", *CPU_SOURCES], optional=True)],
    cmdclass={"build_ext": NinjaBuildExt},
)
