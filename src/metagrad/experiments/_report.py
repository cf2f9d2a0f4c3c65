"""Options shared by the experiments, and their tables and reports."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MISSING = "—"
"""The mark of a cell whose run has not finished."""


@dataclass(frozen=True)
class Options:
    """What ``metagrad experiment NAME`` passes to every experiment."""

    out: Path
    quick: bool = False
    data: Path | None = None
    device: str = "cpu"
    seeds: int | None = None
    budget_minutes: float | None = None
    steps: int | None = None
    lake_runs: Path | None = None
    cells: tuple[str, ...] | None = None


@dataclass
class Table:
    """A titled table: ``rows`` are lists of cells (numbers, strings, or None for missing)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_markdown(self, digits: int = 3) -> str:
        def cell(v: Any) -> str:
            if v is None:
                return MISSING
            if isinstance(v, float):
                return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
            return str(v)

        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("| " + " | ".join("---" for _ in self.columns) + " |")
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"


@dataclass
class Report:
    """An experiment's result: tables, figure paths, and facts about the run (machine, time)."""

    name: str
    tables: list[Table]
    figures: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        parts = [t.to_markdown() for t in self.tables]
        parts += [f"Figure: `{p}`" for p in self.figures]
        return "\n".join(parts)

    def save(self, out: Path | str) -> None:
        """Write ``NAME.md`` and ``NAME.json`` into ``out`` (atomically: temp file, rename)."""
        out = Path(out)
        data = {
            "name": self.name,
            "tables": [asdict(t) for t in self.tables],
            "figures": [str(p) for p in self.figures],
            "info": self.info,
        }
        for suffix, text in (
            (".md", self.to_markdown()),
            (".json", json.dumps(data, indent=2, default=str)),
        ):
            path = out / f"{self.name}{suffix}"
            tmp = path.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
