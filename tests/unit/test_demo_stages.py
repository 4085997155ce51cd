"""The demo's resume rule: a finished stage leaves a marker and is skipped on the next run; a
failed stage leaves none, stops the demo, and runs again next time."""

import sys

import pytest

from pipelines.demo import Stages


def test_finished_stages_are_skipped_and_failed_ones_rerun(tmp_path, capsys):
    log = tmp_path / "ran.txt"
    append = [sys.executable, "-c", f"open({str(log)!r}, 'a').write('x')"]
    stages = Stages(tmp_path / "work", env={})
    assert stages.run("one", "first stage", append) == 0
    assert Stages(tmp_path / "work", env={}).run("one", "first stage", append) == 0
    assert log.read_text() == "x"  # the second run skipped it
    assert "done in an earlier run" in capsys.readouterr().out

    fail = [sys.executable, "-c", "raise SystemExit(4)"]
    with pytest.raises(SystemExit):
        stages.run("two", "second stage", fail)
    assert "stage 'second stage' failed with exit status 4" in capsys.readouterr().err
    assert not (tmp_path / "work" / ".demo" / "two.json").exists()
    assert stages.run("two", "second stage", append) == 0 and log.read_text() == "xx"
    # An accepted non-zero exit (promotion rejected) is a finished stage too, remembered as such.
    assert stages.run("three", "third stage", fail, ok_codes=(0, 4)) == 4
    assert stages.run("three", "third stage", append) == 4 and log.read_text() == "xx"
