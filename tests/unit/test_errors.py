"""User-facing errors: one ``error: ...`` line and exit code 1, tracebacks only on request or for bugs."""
from __future__ import annotations

import pytest

from kdseg.errors import DataError, KdsegError, one_line, reported


def test_kdseg_error_becomes_one_line_and_exit_code_1(monkeypatch):
    monkeypatch.delenv("KDSEG_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info, reported():
        raise DataError("mask 'a.png' has label(s) 30 outside 0..20 and 255\n(16 pixels)")
    assert exit_info.value.code == "error: mask 'a.png' has label(s) 30 outside 0..20 and 255 (16 pixels)"
    assert exit_info.value.__suppress_context__  # no chained traceback either


@pytest.mark.parametrize("value", ["1", "yes"])
def test_kdseg_debug_shows_the_exception(monkeypatch, value):
    monkeypatch.setenv("KDSEG_DEBUG", value)
    with pytest.raises(DataError), reported():
        raise DataError("x")


def test_other_exceptions_are_bugs_and_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("KDSEG_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError), reported():
        1 / 0


def test_error_from_a_dataloader_worker_keeps_only_the_original_message():
    wrapped = KdsegError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise DataError(msg)\n'
        "kdseg.errors.DataError: image 'b.jpg' is truncated or corrupt (OSError: image file is truncated)\n"
    )
    assert one_line(wrapped) == "image 'b.jpg' is truncated or corrupt (OSError: image file is truncated)"
