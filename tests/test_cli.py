import subprocess
import sys

from qwen_core.cli import COMMANDS, main


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_every_command_is_listed_in_help():
    out = subprocess.run([sys.executable, "-m", "qwen_core", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
