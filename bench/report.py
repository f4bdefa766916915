"""Where a benchmark's report goes besides the terminal: a Markdown file, when --out names one."""

from __future__ import annotations

from pathlib import Path


def save(lines: list[str], out: str | Path | None) -> None:
    """Write the report's lines to `out`, creating its folder; nothing when `out` is None."""
    if out is None:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
