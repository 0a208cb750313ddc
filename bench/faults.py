"""The fault table: runs the fault suite (`pytest -m faults`) and prints one row per injected
fault: items expected, stored, duplicate objects, lost, failed, how the job ended, and how many
chunks ran more than once (duplicate work, which is allowed; duplicate objects are not).

    python -m bench.faults
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

COLUMNS = ("fault", "expected", "stored", "duplicates", "lost", "failed", "outcome", "redelivered")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="farm-faults-") as tmp:
        report = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "FARM_FAULT_REPORT": str(report)}
        run = subprocess.run([sys.executable, "-m", "pytest", "-m", "faults", "-q", "-p", "no:cacheprovider",
                              *sys.argv[1:]], env=env)
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in COLUMNS]
    print()
    print(" | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(row[c]).ljust(w) for c, w in zip(COLUMNS, widths)))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
