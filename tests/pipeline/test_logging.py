"""Logging: library modules log (never print, never configure logging on import); the command line
shows messages on stdout and appends them to a log file in the output folder; under torchrun only
rank 0 writes unless E2PA_LOG_ALL_RANKS=1."""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from e2pa import log as logs

ROOT = Path(__file__).resolve().parents[2]
COMMAND_LINE = ("e2pa/cli.py", "e2pa/commands/")  # may print a command's results for the user


def test_library_modules_do_not_print():
    offenders = []
    for path in sorted((ROOT / "e2pa").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(COMMAND_LINE):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{relative}:{node.lineno}")
    assert not offenders, offenders


def test_importing_the_package_configures_no_logging():
    code = (
        "import logging, e2pa, e2pa.cli, e2pa.engine.training, e2pa.engine.inference, e2pa.engine.demo, "
        "e2pa.engine.ablation; from e2pa import E2PANet; "
        "assert not logging.getLogger('e2pa').handlers and not logging.getLogger().handlers; print('clean')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr[-2000:]


def _emit(verbose: bool = False, log_file: Path | None = None) -> tuple[str, Path | None]:
    out = io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        logs.console(verbose=verbose),
        logs.run_log(log_file, verbose=verbose) if log_file else contextlib.nullcontext() as written,
    ):
        logger = logging.getLogger("e2pa.engine.test")
        logger.debug("a detail")
        logger.info("an epoch row")
        logger.warning("a skipped step")
    return out.getvalue(), written


def test_console_and_run_log_on_rank_zero(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    stdout, written = _emit(log_file=tmp_path / "run" / "train.log")
    assert stdout == "an epoch row\nwarning: a skipped step\n"
    assert written == tmp_path / "run" / "train.log"
    text = written.read_text()
    assert "INFO e2pa.engine.test: an epoch row" in text and "WARNING e2pa.engine.test: a skipped step" in text
    assert "a detail" not in text
    stdout, _ = _emit(verbose=True, log_file=written)  # appends, never truncates
    assert "a detail" in stdout and written.read_text().startswith(text) and "DEBUG" in written.read_text()
    assert not logging.getLogger("e2pa").handlers  # everything removed after the block


def test_the_log_file_appears_with_the_first_message(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with logs.run_log(tmp_path / "out" / "infer.log"):
        pass
    assert not (tmp_path / "out").exists()  # a command that refuses a non-empty folder still finds it empty


@pytest.mark.parametrize("all_ranks", [False, True])
def test_other_ranks_are_quiet_unless_asked(tmp_path, monkeypatch, all_ranks):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(logs.ALL_RANKS_VARIABLE, "1" if all_ranks else "0")
    stdout, written = _emit(log_file=tmp_path / "train.log")
    assert not (tmp_path / "train.log").exists()
    if all_ranks:
        assert stdout == "[rank 1] an epoch row\n[rank 1] warning: a skipped step\n"
        assert written == tmp_path / "train.rank1.log" and "an epoch row" in written.read_text()
    else:
        assert stdout == "[rank 1] warning: a skipped step\n" and written is None
        assert not list(tmp_path.iterdir())


def test_a_log_file_that_cannot_be_written_stops_with_one_warning(tmp_path, monkeypatch):
    """Disk full under the run log: one console warning naming the file and the error, no logging
    traceback on stderr, the command's messages keep reaching the console."""
    import errno

    monkeypatch.delenv("RANK", raising=False)
    path = tmp_path / "run" / "train.log"

    class FullDisk(io.TextIOBase):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logs._RunFileHandler, "_open", lambda self: FullDisk())
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), logs.console(), logs.run_log(path):
        logger = logging.getLogger("e2pa.engine.test")
        for step in range(3):
            logger.info("row %d", step)
    lines = out.getvalue().splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and str(path) in warnings[0] and "No space left on device" in warnings[0], lines
    assert [line for line in lines if line.startswith("row")] == ["row 0", "row 1", "row 2"]
    assert err.getvalue() == ""
