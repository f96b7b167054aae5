"""Developer tools that are not part of the installed package: the ahead-of-time GPU compile check of the
Triton kernels (aot_compile.py, used by tests/tools/ and CI) and the resource table script."""
