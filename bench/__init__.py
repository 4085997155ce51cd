"""``w2svd bench NAME [ARGS...]``: the project's benchmarks, one module each in this folder.

``NAME`` is the module's name with ``-`` for ``_`` (``toy-family`` → ``bench/toy_family.py``);
each module has ``main(argv: list[str] | None) -> int``. Modules whose name starts with ``_`` are
helpers, not benchmarks. Results and how to read them: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys


def available() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: w2svd bench {{{','.join(names)}}} [ARGS...]\n\n{__doc__}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"bench.{argv[0].replace('-', '_')}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
