"""What the thin scripts in ``jobs/`` run: ``--config PRESET_OR_PATH [key=value ...]``.

A Ray job's driver runs on the cluster's head node with ``RAY_ADDRESS`` set, so
``ray.init()`` inside the stages joins the cluster instead of starting a local one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ktray.cli import main as cli_main


def main(command: str, argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"jobs/{command}.py")
    ap.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cluster.k=500")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    return cli_main([command, args.config, *args.overrides])
