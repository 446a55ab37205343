"""``signals_held``: SIGINT / SIGTERM arriving inside a native-heavy step (torch's ONNX exporter) take
effect when the step ends, never as an exception raised inside it; a repeat acts at once."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from anoclip_core.cli_errors import Terminated, signals_held, sigterm_unwinds


def _kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(1000):  # a few bytecodes: Python runs the handler at the next check
        pass


def test_sigterm_inside_is_raised_when_the_block_ends(capsys):
    reached = []
    with sigterm_unwinds(), pytest.raises(Terminated):
        with signals_held("the test step"):
            _kill_self(signal.SIGTERM)
            reached.append("after the signal")
        reached.append("after the block")
    assert reached == ["after the signal"]
    assert "SIGTERM received; stopping when the test step ends" in capsys.readouterr().err


def test_a_repeated_signal_acts_at_once():
    reached = []
    with sigterm_unwinds(), pytest.raises(Terminated):
        with signals_held("the test step"):
            _kill_self(signal.SIGTERM)
            reached.append("first held")
            _kill_self(signal.SIGTERM)
            reached.append("second held")
    assert reached == ["first held"]


def test_sigint_inside_becomes_keyboardinterrupt_at_the_end():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held("the test step"):
            _kill_self(signal.SIGINT)
            reached.append("after the signal")
    assert reached == ["after the signal"]


def test_handlers_are_restored_with_and_without_a_signal():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with signals_held("a quiet step"):
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before
    with sigterm_unwinds():
        unwinding = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Terminated), signals_held("a step"):
            _kill_self(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is unwinding
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_onnx_exporter_is_never_interrupted_mid_call(tmp_path, monkeypatch):
    """The exporter (faked: a SIGTERM arrives while it runs) finishes; the export then unwinds
    with nothing written at the destination."""
    from anoclip.export import onnx_export
    from anoclip.export.wrapper import AnoCLIPExportWrapper

    calls = []

    class Program:
        def save(self, path: str, external_data: bool = False) -> None:
            calls.append("saved")
            with open(path, "wb") as f:
                f.write(b"graph")

    def exporter(*args, **kwargs):
        _kill_self(signal.SIGTERM)
        calls.append("exporter returned")
        return Program()

    monkeypatch.setattr(torch.onnx, "export", exporter)
    monkeypatch.setattr(onnx_export, "_param_bytes", lambda w: 0)
    monkeypatch.setattr(AnoCLIPExportWrapper, "eval", lambda self: self)
    dest = tmp_path / "encoder.onnx"
    with sigterm_unwinds(), pytest.raises(Terminated):
        onnx_export.export_onnx(AnoCLIPExportWrapper.__new__(AnoCLIPExportWrapper), dest, 32, 8)
    assert calls == ["exporter returned", "saved"]
    assert list(tmp_path.iterdir()) == []  # no graph, no scratch folder
