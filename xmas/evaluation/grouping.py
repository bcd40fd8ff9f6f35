"""Which benchmark each question of a held-out split counts toward: its ``question_type`` when every
record carries one, else its ``source``, else one benchmark named after the file."""

from __future__ import annotations

from pathlib import Path

GROUPING_FIELDS = ("question_type", "source")


def grouping_field(records: list) -> str | None:
    """The first of :data:`GROUPING_FIELDS` that every record carries as a non-empty string."""
    for field in GROUPING_FIELDS:
        if records and all(
            isinstance(record, dict) and isinstance(record.get(field), str) and record[field] for record in records
        ):
            return field
    return None


def benchmark_names(records: list, test: str | Path) -> tuple[list[str], str]:
    """Each record's benchmark, and what they are grouped by (a field, or the file)."""
    field = grouping_field(records)
    if field is None:
        return [Path(test).stem] * len(records), f"the file (no field {' or '.join(GROUPING_FIELDS)} on every record)"
    return [record[field] for record in records], field
