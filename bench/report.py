"""How a benchmark shows what it measured: a two-column table on stdout and its figures in a JSON file."""

from __future__ import annotations

import json
from pathlib import Path


def print_measures(rows: list[tuple[str, str]]) -> None:
    """``rows`` of (measure, value) as a table with a ``measure | value`` head, the first column padded."""
    width = max(len(measure) for measure, _ in rows)
    print(f"{'measure':<{width}} | value")
    print(f"{'-' * width} | -----")
    for measure, value in rows:
        print(f"{measure:<{width}} | {value}")


def save_json(path: Path, result: object) -> None:
    """``result`` as indented JSON at ``path`` (its folder made if missing), and a line saying so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
