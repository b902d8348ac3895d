"""The ``prefixgate`` command line: bad flags are one line and exit 2; help shows every default."""

from __future__ import annotations

import pytest

from gateway import cli


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["gateway", "--log-level", "verbose"], "invalid choice: 'verbose'"),
        (["--log-level", "loud", "gateway"], "invalid choice: 'loud'"),
        (
            ["gateway", "--admin-key", "SECRET"],
            "unrecognized arguments: --admin-key SECRET",
        ),  # no abbreviation
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, complaint, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and complaint in err and "Traceback" not in err


def test_log_level_is_accepted_before_or_after_the_subcommand() -> None:
    assert cli.build_parser(["gateway"]).parse_args(["--log-level", "DEBUG", "gateway"]).log_level == "debug"
    assert (
        cli.build_parser(["gateway"]).parse_args(["gateway", "--log-level", "warning"]).log_level == "warning"
    )
    assert cli.build_parser(["gateway"]).parse_args(["gateway"]).log_level == "info"


def test_help_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["gateway", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8080)" in out and "(default: cache_aware)" in out
