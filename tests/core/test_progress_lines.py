"""Outside a terminal (logs, CI, ``nohup``) Rich's bar and spinner print nothing: long work reports itself in lines
instead, one per phase when it ends and one per twentieth of the steps, and a phase that fails adds nothing to the
one-line error."""

from __future__ import annotations

import re

import pytest

from cfdeploy.cli.common import PhaseLines, ProgressLines, phase, progress_bar
from conftest import PROGRESS_LINE


def lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_outside_a_terminal_the_bar_and_the_spinner_are_lines(capsys):
    assert isinstance(progress_bar(), ProgressLines)
    assert isinstance(phase("loading"), PhaseLines)


def test_a_hundred_steps_print_the_first_then_one_line_per_twentieth(capsys):
    with ProgressLines() as bar:
        task = bar.add_task("training", total=100)
        for step in range(1, 101):
            bar.update(task, completed=step, description=f"loss {1 / step:.2f}")
    printed = lines(capsys)
    assert [int(re.search(r"\[(\d+)/100\]", line)[1]) for line in printed] == [1, *range(5, 101, 5)]
    assert printed[-1] == "loss 0.01 [100/100]"


def test_each_stage_is_a_line_with_its_time_when_the_next_one_begins(capsys):
    with ProgressLines() as bar:
        task = bar.add_task("starting", total=2)
        bar.update(task, description="loading CLIP")
        bar.update(task, description="loading the generator")
        assert [re.sub(r"\d+\.\d", "T", line) for line in lines(capsys)] == ["loading CLIP (T s)"]
        bar.update(task, advance=1, description="step")
    assert [re.sub(r"\d+\.\d", "T", line) for line in lines(capsys)] == ["loading the generator (T s)", "step [1/2]"]


def fail_while_loading(progress: ProgressLines) -> None:
    with progress as bar:
        task = bar.add_task("starting", total=3)
        bar.update(task, description="loading the generator")
        raise ValueError("damaged")


def test_a_stage_that_fails_prints_nothing_of_its_own(capsys):
    with pytest.raises(ValueError, match="damaged"):
        fail_while_loading(ProgressLines())
    with pytest.raises(ValueError, match="damaged"), PhaseLines("loading models"):
        raise ValueError("damaged")
    assert lines(capsys) == []


def test_a_phase_that_counts_from_zero_again_is_reported_again(capsys):
    with ProgressLines() as bar:
        task = bar.add_task("starting")
        for phase_name in ("U", "delta"):
            for step in range(1, 41):
                bar.update(task, completed=step, total=40, description=phase_name)
    printed = lines(capsys)
    assert printed.count("U [1/40]") == 1 and printed.count("delta [1/40]") == 1
    assert printed[-1] == "delta [40/40]" and len(printed) == 2 * 21


def test_slow_steps_print_a_line_each_once_a_minute_has_passed(capsys, monkeypatch):
    monkeypatch.setattr(ProgressLines, "QUIET_S", 0.0)
    with ProgressLines() as bar:
        task = bar.add_task("sampling", total=1000)
        for _ in range(3):
            bar.advance(task)
    assert lines(capsys) == ["sampling [1/1000]", "sampling [2/1000]", "sampling [3/1000]"]


def test_every_line_printed_is_one_the_tests_know_as_progress(capsys):
    with PhaseLines("loading models"), ProgressLines() as bar:
        task = bar.add_task("editing (torch)", total=3)
        bar.update(task, description="reading the latents")
        bar.advance(task, 3)
    printed = lines(capsys)
    assert len(printed) == 3 and all(PROGRESS_LINE.fullmatch(line) for line in printed), printed
    assert not PROGRESS_LINE.fullmatch("error: mean_w.npy: holds float32 [10], expected float32 [512]")


def test_an_edit_in_a_log_reports_loading_and_each_image(cli, tmp_path, cfclip_64, latents_64, embedding_file):
    result = cli("edit", "-c", cfclip_64, "-l", latents_64, "--text-embedding", embedding_file, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    printed = result.stderr.splitlines()
    assert re.fullmatch(r"loading models \(\d+\.\d s\)", printed[0]), printed
    assert re.fullmatch(r"editing \(torch\) \[\d+/\d+\]", printed[-2]), printed
