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


def test_help_of_one_command_imports_only_its_module():
    """`preflight --help` must not pay for torch/diffusers or load the other commands' modules."""
    code = (
        "import sys\n"
        "from qwen_core.cli import main\n"
        "try:\n"
        "    main(['preflight', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'qwen_core.demo', 'qwen_core.tiny', 'qwen_core.download')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--target" in out.stdout  # the preflight module did configure its parser
    assert out.stdout.strip().splitlines()[-1] == "[]"
