"""The `ptk` command. Each sub-command lives in its own module; this file only dispatches.

    ptk check        a quick tour: fused vs eager linear cross-entropy on this machine
"""

from __future__ import annotations

import sys

COMMANDS = {
    "check": ("ptkernels.check", "fused vs eager linear cross-entropy on this machine (time, memory, loss)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ptk COMMAND [options]   (ptk COMMAND --help for its options)\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<12}{doc}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ptk: unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    return int(importlib.import_module(COMMANDS[name][0]).main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
