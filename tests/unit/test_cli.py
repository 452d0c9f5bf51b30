"""The ``folora-ds`` command's logging: phase lines through ``logging`` on stderr, ``--quiet`` / ``--verbose`` on
every command, the rank in the prefix under a launcher, only the package's own logger touched."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from folora_ds.cli import configure_logging, main

PACKAGE_LOGGER = logging.getLogger("folora_ds")


@pytest.fixture(autouse=True)
def _restore_package_logger():
    handlers, level, propagate = PACKAGE_LOGGER.handlers[:], PACKAGE_LOGGER.level, PACKAGE_LOGGER.propagate
    yield
    PACKAGE_LOGGER.handlers[:], PACKAGE_LOGGER.level, PACKAGE_LOGGER.propagate = handlers, level, propagate


def test_a_module_logger_reaches_stderr_with_the_prefix_at_info_and_not_below(capsys):
    configure_logging(logging.INFO)
    logging.getLogger("folora_ds.toolkit.evaluation").info("evaluating %s", "folora")
    logging.getLogger("folora_ds.toolkit.evaluation").debug("hidden detail")
    err = capsys.readouterr().err
    assert "[folora-ds] evaluating folora" in err
    assert "hidden detail" not in err


def test_quiet_keeps_warnings_only(capsys):
    configure_logging(logging.WARNING)
    logging.getLogger("folora_ds.training.models").info("preparing the model")
    logging.getLogger("folora_ds.training.models").warning("something to fix")
    err = capsys.readouterr().err
    assert "preparing the model" not in err and "[folora-ds] something to fix" in err


def test_the_rank_is_named_under_a_launcher_of_several_processes(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    configure_logging(logging.INFO)
    logging.getLogger("folora_ds.toolkit.grid").info("training run 3")
    assert "[folora-ds] [rank 1] training run 3" in capsys.readouterr().err


def test_other_libraries_loggers_are_left_alone():
    deepspeed_logger = logging.getLogger("deepspeed")
    before = (deepspeed_logger.handlers[:], deepspeed_logger.level)
    configure_logging(logging.DEBUG)
    assert (deepspeed_logger.handlers, deepspeed_logger.level) == before
    assert len(PACKAGE_LOGGER.handlers) == 1 and not PACKAGE_LOGGER.propagate
    configure_logging(logging.INFO)
    assert len(PACKAGE_LOGGER.handlers) == 1  # configured twice: still one handler


def test_lines_follow_stderr_when_it_is_swapped_after_configuring(monkeypatch):
    configure_logging(logging.INFO)
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)  # e.g. a second main() under another capture
    logging.getLogger("folora_ds.training.run").info("after the swap")
    assert "[folora-ds] after the swap" in swapped.getvalue()


@pytest.mark.parametrize(("flags", "level"), [([], logging.INFO), (["--quiet"], logging.WARNING),
                                              (["-q"], logging.WARNING), (["--verbose"], logging.DEBUG),
                                              (["-v"], logging.DEBUG)])
def test_every_command_takes_quiet_and_verbose_after_its_name(flags, level, capsys):
    assert main(["plan", "--model-config", "llama-3-8b", "--world", "8", "--solve-rate", "1.0", *flags]) == 0
    assert PACKAGE_LOGGER.level == level
    assert capsys.readouterr().out.strip()  # the plan itself goes to stdout, whatever the log level


def test_quiet_and_verbose_together_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["plan", "--model-config", "llama-3-8b", "--quiet", "--verbose"])
    assert stop.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
