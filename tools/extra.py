"""Print the requirements of one of pyproject.toml's extras, one per line, for `pip install $(...)`:
tools/lint.sh installs the linters alone this way, before (and without) the package's own dependencies."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extra: str) -> list[str]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    if extra not in extras:
        raise SystemExit(f"{PYPROJECT}: no extra named {extra!r} (the extras: {', '.join(extras)})")
    return extras[extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("extra", help="the extra's name in [project.optional-dependencies]")
    print("\n".join(requirements(parser.parse_args().extra)))


if __name__ == "__main__":
    main()
