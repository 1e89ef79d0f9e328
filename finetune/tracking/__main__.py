"""`python -m finetune.tracking [--uri URI] [--outputs DIR]`: mark KILLED the MLflow runs whose process is gone.

A run killed with -9 (or by the OOM killer) cannot end its own MLflow run, which then stays RUNNING. `make ui`
runs this before it starts the UI, so the listing shows those runs as KILLED, ended when their directory last
changed. Nothing is created: without the store, or without run directories, it does nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.tracking", description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="sqlite:///mlflow.db", help="the MLflow store (default: ./mlflow.db)")
    parser.add_argument("--outputs", default="outputs", help="the run directories' root (default: ./outputs)")
    args = parser.parse_args(argv)
    store = Path(args.uri.removeprefix("sqlite:///")) if args.uri.startswith("sqlite:///") else None
    if (store is not None and not store.is_file()) or not Path(args.outputs).is_dir():
        return 0
    from finetune.quiet import quiet_libraries
    from finetune.tracking import end_dead_runs_under

    quiet_libraries()
    ended = end_dead_runs_under(Path(args.outputs), args.uri)
    if ended:
        print(f"marked {len(ended)} MLflow run{'s' if len(ended) > 1 else ''} KILLED whose process is gone "
              f"(kill -9, the OOM killer, a crash): {', '.join(ended)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
