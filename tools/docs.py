"""Write the documentation pages that are generated: ``python tools/docs.py``.

- ``docs/configuration.md``: every setting of the config schema (tests/test_settings.py checks it).
"""

from __future__ import annotations

from pathlib import Path

from xmas.settings import reference_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    (DOCS / "configuration.md").write_text(reference_markdown())
    print(f"wrote {DOCS / 'configuration.md'}")


if __name__ == "__main__":
    main()
