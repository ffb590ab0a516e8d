"""Where every bench script leaves its figures: `bench/results/<name>-<time>[-tag].json` and `.md` (gitignored),
one pair per run, so earlier measurements are never overwritten."""

from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, record: dict, markdown: str, folder: Path = RESULTS, tag: str = "") -> Path:
    """The record as JSON and the table as markdown under one time-stamped stem; returns the stem."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}{f'-{tag}' if tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown.rstrip("\n") + "\n", encoding="utf-8")
    return stem
