"""The command line: help lists the subcommands; unknown ones are clear errors."""

from dpolab.cli import main


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "inspect", "report", "compare", "bench", "reproduce"):
        assert name in out


def test_unknown_command_and_experiment(capsys):
    assert main(["frob"]) == 2
    assert "unknown command 'frob'" in capsys.readouterr().err
    assert main(["reproduce", "nothing"]) == 2
    assert "unknown experiment 'nothing'; valid: did, misspecification, values" in \
        capsys.readouterr().err
    assert main(["bench", "nothing"]) == 2
    assert "unknown benchmark 'nothing'" in capsys.readouterr().err
