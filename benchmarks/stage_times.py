"""Wall time of every stage of a run root, from its ``events.jsonl``, as a Markdown table.

Each computed stage folder is one line: the stage, the folder, the seconds its last attempt took
(``finished`` event) and how many times it was started (more than once: it was interrupted and
resumed from its checkpoint). Reused folders cost nothing and are not listed.

    python benchmarks/stage_times.py runs/imagenette-cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def stage_times(root: str) -> list[dict]:
    """One dict per finished stage folder, in the order they finished."""
    events = [json.loads(line) for line in (Path(root) / "events.jsonl").read_text().splitlines() if line.strip()]
    starts: dict[str, int] = {}
    out = []
    for e in events:
        if e["event"] == "started":
            starts[e["dir"]] = starts.get(e["dir"], 0) + 1
        elif e["event"] == "finished":
            out.append({"stage": e["stage"], "dir": e["dir"], "seconds": float(e["seconds"]),
                        "starts": starts.get(e["dir"], 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    args = p.parse_args()
    rows = stage_times(args.root)
    print("| stage | folder | seconds | starts |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | `{r['dir']}` | {r['seconds']:.0f} | {r['starts']} |")
    print(f"| **all** | | **{sum(r['seconds'] for r in rows):.0f}** | |")


if __name__ == "__main__":
    main()
