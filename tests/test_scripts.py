"""Set-up scripts: .sh/.ps1 twins with the same options, bash syntax, and launch/restart behaviour.

PowerShell cannot run on our machines, so the .ps1 files are checked statically; the .sh scripts run
against a stand-in ComfyUI (a main.py that records its arguments and sleeps).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SH = sorted(SCRIPTS.glob("*.sh"))
EXPECTED = {"setup", "demo", "test", "launch_ui", "safe_restart", "setup_hf_transfer"}


def sh_options(path: Path) -> set[str]:
    """Options documented in the leading comment block: the Usage line and '#   --opt ...' lines."""
    header = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    opts = set()
    for line in header:
        if "Usage:" in line:
            opts |= set(re.findall(r"\[(--[a-z][\w-]*)", line))
        m = re.match(r"#\s+(--[a-z][\w-]*)", line)
        if m:
            opts.add(m.group(1))
    return {o[2:] for o in opts} - {"help"}


def ps1_params(path: Path) -> tuple[set[str], set[str]]:
    """(named parameters, remaining-argument parameters) of the script's param(...) block."""
    text = path.read_text()
    start = re.search(r"^param\(", text, re.MULTILINE | re.IGNORECASE)
    assert start, f"{path.name} has no param(...) block"
    depth, i = 0, start.end() - 1
    while True:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            break
        i += 1
    block = text[start.end():i]
    rest = set(re.findall(r"ValueFromRemainingArguments\s*=\s*\$true[^$]*\$(\w+)", block))
    names = set(re.findall(r"\$(\w+)", block)) - {"true", "false", "null"}
    return names - rest, rest


def norm(name: str) -> str:
    return name.replace("-", "").lower()


class TestTwins:
    def test_every_script_exists_in_both_forms(self):
        assert {p.stem for p in SH} >= EXPECTED
        assert {p.stem for p in SH} == {p.stem for p in SCRIPTS.glob("*.ps1")}

    @pytest.mark.parametrize("sh", SH, ids=lambda p: p.name)
    def test_same_documented_options(self, sh):
        ps1 = sh.with_suffix(".ps1")
        named, _rest = ps1_params(ps1)
        assert {norm(o) for o in sh_options(sh)} == {norm(n) for n in named}
        # ... and the PowerShell help documents each of them, and mentions WSL.
        help_text = ps1.read_text().split("#>")[0]
        for name in named:
            assert re.search(rf"-{name}\b", help_text), f"{ps1.name} help does not document -{name}"
        assert "WSL" in help_text

    def test_option_parser_finds_the_known_options(self):
        assert sh_options(SCRIPTS / "setup.sh") == {"dev", "force", "cuda"}
        assert sh_options(SCRIPTS / "launch_ui.sh") == {"listen", "port", "cpu", "foreground"}
        assert sh_options(SCRIPTS / "demo.sh") == set()
        assert ps1_params(SCRIPTS / "demo.ps1") == (set(), {"Rest"})

    @pytest.mark.parametrize("sh", SH, ids=lambda p: p.name)
    def test_bash_syntax(self, sh):
        out = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr

    @pytest.mark.parametrize("sh", SH, ids=lambda p: p.name)
    def test_unknown_option_is_refused(self, sh):
        if not sh_options(sh):
            pytest.skip("passes arguments through")
        out = subprocess.run(["bash", str(sh), "--bogus"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "unknown option" in out.stderr


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_DIR"}
    env.update(QWEN_REPORTS_DIR=str(tmp_path / "reports"), COMFYUI_PYTHON=sys.executable, **extra)
    return env


FAKE_MAIN = """
import pathlib, signal, sys, time
pathlib.Path("argv.txt").write_text(" ".join(sys.argv[1:]))
if "{mode}" == "polite":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a hung ComfyUI: needs SIGKILL
while True:
    time.sleep(0.05)
"""


def _fake_comfyui(tmp_path, mode="polite"):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text(FAKE_MAIN.replace("{mode}", mode))
    return comfy


def _pid(tmp_path) -> int:
    return int((tmp_path / "reports" / "comfyui.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _stop(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


class TestLaunchAndRestart:
    @pytest.mark.parametrize("script", ["launch_ui.sh", "safe_restart.sh"])
    def test_comfyui_dir_unset_is_a_clear_error(self, script, tmp_path):
        out = subprocess.run(["bash", str(SCRIPTS / script)], env=_env(tmp_path), capture_output=True, text=True)
        assert out.returncode == 2 and "COMFYUI_DIR is not set" in out.stderr

    def test_comfyui_dir_without_main_py(self, tmp_path):
        out = subprocess.run(["bash", str(SCRIPTS / "launch_ui.sh")], env=_env(tmp_path, COMFYUI_DIR=str(tmp_path)),
                             capture_output=True, text=True)
        assert out.returncode == 2 and "no main.py" in out.stderr

    @pytest.mark.parametrize("mode", ["polite", "stubborn"])
    def test_launch_then_safe_restart(self, tmp_path, mode):
        comfy = _fake_comfyui(tmp_path, mode)
        env = _env(tmp_path, COMFYUI_DIR=str(comfy))
        pids = []
        try:
            out = subprocess.run(["bash", str(SCRIPTS / "launch_ui.sh"), "--port", "8199"], env=env,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            pids.append(_pid(tmp_path))
            assert _alive(pids[0])
            link = comfy / "custom_nodes" / "comfyui-qwen-image"
            assert link.is_symlink() and link.resolve() == ROOT
            assert (comfy / "argv.txt").read_text() == "--listen 127.0.0.1 --port 8199"

            again = subprocess.run(["bash", str(SCRIPTS / "launch_ui.sh")], env=env, capture_output=True, text=True)
            assert again.returncode == 0 and "already running" in again.stdout and _pid(tmp_path) == pids[0]

            out = subprocess.run(["bash", str(SCRIPTS / "safe_restart.sh"), "--timeout", "1", "--listen", "0.0.0.0",
                                  "--cpu"], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            pids.append(_pid(tmp_path))
            assert pids[1] != pids[0] and not _alive(pids[0]) and _alive(pids[1])
            assert ("SIGKILL" in out.stdout) == (mode == "stubborn")
            assert (comfy / "argv.txt").read_text() == "--listen 0.0.0.0 --port 8188 --cpu"
        finally:
            for pid in pids:
                _stop(pid)

    def test_safe_restart_refuses_a_recycled_pid(self, tmp_path):
        comfy = _fake_comfyui(tmp_path)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            (tmp_path / "reports").mkdir()
            (tmp_path / "reports" / "comfyui.pid").write_text(str(other.pid))
            out = subprocess.run(["bash", str(SCRIPTS / "safe_restart.sh")], env=_env(tmp_path, COMFYUI_DIR=str(comfy)),
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 1 and "not a ComfyUI" in out.stderr
            time.sleep(0.1)
            assert other.poll() is None
        finally:
            other.kill()
            other.wait()

    def test_foreign_custom_node_folder_is_not_replaced(self, tmp_path):
        comfy = _fake_comfyui(tmp_path)
        (comfy / "custom_nodes" / "comfyui-qwen-image").mkdir(parents=True)
        out = subprocess.run(["bash", str(SCRIPTS / "launch_ui.sh")], env=_env(tmp_path, COMFYUI_DIR=str(comfy)),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "not a link to this checkout" in out.stderr


def test_setup_hf_transfer_explains_hf_xet(tmp_path):
    out = subprocess.run(["bash", str(SCRIPTS / "setup_hf_transfer.sh"), "--no-install", "--python", sys.executable],
                         env=_env(tmp_path, HF_HUB_ENABLE_HF_TRANSFER="1"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "export HF_XET_HIGH_PERFORMANCE=1" in out.stdout
    assert "hf_transfer is no longer used" in out.stdout and "HF_HUB_ENABLE_HF_TRANSFER is set but ignored" in out.stdout


def test_launch_reports_a_comfyui_that_dies_at_once(tmp_path):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text("import sys; print('ModuleNotFoundError: no module named torchsde'); sys.exit(1)")
    out = subprocess.run(["bash", str(SCRIPTS / "launch_ui.sh")], env=_env(tmp_path, COMFYUI_DIR=str(comfy)),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "exited at once" in out.stderr and "torchsde" in out.stderr
    assert not (tmp_path / "reports" / "comfyui.pid").exists()
