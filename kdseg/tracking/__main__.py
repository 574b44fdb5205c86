"""``python -m kdseg.tracking FILE``: send the metrics and artifacts kept while MLflow was down."""
from __future__ import annotations

import sys

from kdseg.errors import reported
from kdseg.tracking import PENDING_FILE, replay


def main(argv: list[str] | None = None) -> int:
    """``python -m kdseg.tracking FILE``: send metrics and artifacts kept while MLflow was down."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(f"usage: python -m kdseg.tracking <run folder>/{PENDING_FILE}")
        return 2
    with reported():
        left = replay(args[0])
    print(f"{left} operation(s) still unsent" if left else "all kept MLflow operations sent")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
