<#
.SYNOPSIS
  Set up (with test tools) if needed, lint, then run the whole test suite on the CPU. Twin of scripts/test.sh.
.DESCRIPTION
  Extra arguments go to pytest (e.g. -k governor -x).
  WSL: inside WSL run bash scripts/test.sh instead.
#>
param([Parameter(ValueFromRemainingArguments = $true)][string[]]$Rest)
$ErrorActionPreference = "Stop"
$Root = Split-Path -Parent $PSScriptRoot
& (Join-Path $PSScriptRoot "setup.ps1") -Dev
if ($LASTEXITCODE) { exit $LASTEXITCODE }
$Venv = if ($env:QWEN_VENV) { $env:QWEN_VENV } else { Join-Path $Root ".venv" }
$VPy = Join-Path $Venv "Scripts\python.exe"
Set-Location $Root
& $VPy -m ruff check .
if ($LASTEXITCODE) { exit $LASTEXITCODE }
# Tests never touch a hub or a GPU.
# PowerShell deletes a variable set to "", so hide GPUs with -1 (CUDA then sees none).
$env:HF_HUB_OFFLINE = "1"; $env:HF_HUB_DISABLE_TELEMETRY = "1"; $env:CUDA_VISIBLE_DEVICES = "-1"
& $VPy -m pytest @Rest
exit $LASTEXITCODE
