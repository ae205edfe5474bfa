"""The soak's paying mock wraps the bundled mock's answer functions: they must exist.

(The regroup renamed ``_reply`` to ``_send``; the soak then ran against no mock at all.)
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import worker.mock.upstream as mock_upstream

SOAK = Path(__file__).parent.parent / "soak"


def test_the_paying_mock_wraps_the_mocks_send_and_stream() -> None:
    spec = importlib.util.spec_from_file_location("paying_mock", SOAK / "paying_mock.py")
    assert spec is not None and spec.loader is not None
    paying = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paying)
    assert paying._send is mock_upstream._send
    assert paying._stream is mock_upstream._stream
    for wrapped, wrapper in (
        (paying._send, paying._send_noted),
        (paying._stream, paying._stream_noted),
    ):
        assert list(inspect.signature(wrapper).parameters) == list(
            inspect.signature(wrapped).parameters
        ), "the wrapper takes what the mock passes"
