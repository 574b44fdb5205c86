"""Command-line conveniences applied before Hydra parses ``run.py``'s arguments."""
from __future__ import annotations

from collections.abc import Sequence


def expand_loss_sums(argv: Sequence[str]) -> list[str]:
    """``loss=kd+cwd`` -> ``loss=[kd,cwd]``: a sum of loss options is Hydra's list of options.

    In a sweep each comma-separated value is one setting: ``loss=none,kd+cwd`` ->
    ``loss=[none],[kd,cwd]``. Values that already use Hydra syntax (lists, quotes, sweep
    functions) are left as they are.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "loss" and "+" in value and not any(ch in value for ch in "[]()'\""):
            arg = "loss=" + ",".join(f"[{option.replace('+', ',')}]" for option in value.split(","))
        out.append(arg)
    return out
