"""The one error style for every command (issue 10): a user mistake prints one line,
``fastpref <command>: <message naming the flag>``, and exits 2; ``--debug`` keeps the traceback."""
import pytest

from fastpref.cli import COMMANDS, main
from fastpref.errors import UsageError, missing_extra


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_flags_are_one_line(command, capsys):
    flag = "--seed" if command != "compare" else "--tokens"
    for argv, expected in (([command, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                           ([command, flag, "x"], f"argument {flag}: ")):
        if command == "annotate":
            argv = [command, "rlaif", "-i", "a", "-o", "b", "--labeler", "tiny"] + argv[1:]
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"fastpref {command}: ") and expected in lines[0], lines[0]
        assert lines[0].endswith(" --help)") and f"(see fastpref {command}" in lines[0]


def test_debug_reraises(capsys):
    with pytest.raises(UsageError, match="unrecognized arguments"):
        main(["train", "--no-such-flag", "--debug"])


def test_missing_extra_names_the_install_command():
    exc = missing_extra(ModuleNotFoundError("No module named 'peft'", name="peft"))
    assert isinstance(exc, UsageError) and str(exc) == \
        "needs the 'hf' extra (module 'peft' is not installed): pip install \"fastpref[hf]\""
    assert missing_extra(ModuleNotFoundError("x", name="numpy_missing_thing")) is None
