"""Entry point: `python study/run.py --space search_spaces/grid.yaml` (see study/cli.py)."""
import sys
from pathlib import Path

# Running this file puts study/ first on sys.path, where its modules could shadow
# top-level packages; drop it and import the installed package instead.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
