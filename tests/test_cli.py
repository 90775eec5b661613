"""The command line's own paths (the real commands run in the other tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import main


def test_analyze_needs_a_folder_or_a_study(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze"]) == 2
    assert "STUDY_DIR or --study" in capsys.readouterr().err


def test_analyze_study_without_a_spool_says_so(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--study", "1.2.3", "--spool-dir", str(tmp_path)]) == 1
    assert "no spool index" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "liver-node 0.1.0" in capsys.readouterr().out
