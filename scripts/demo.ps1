<#
.SYNOPSIS
  The main job: set up if needed, then build a tiny offline Qwen-Image pipeline and generate an image.
  Twin of scripts/demo.sh.
.DESCRIPTION
  Extra arguments go to `python -m qwen_core demo` (e.g. --out demo.png --width 128 --height 96).
  WSL: inside WSL run bash scripts/demo.sh instead.
#>
param([Parameter(ValueFromRemainingArguments = $true)][string[]]$Rest)
$ErrorActionPreference = "Stop"
$Root = Split-Path -Parent $PSScriptRoot
& (Join-Path $PSScriptRoot "setup.ps1")
if ($LASTEXITCODE) { exit $LASTEXITCODE }
$Venv = if ($env:QWEN_VENV) { $env:QWEN_VENV } else { Join-Path $Root ".venv" }
Set-Location $Root
& (Join-Path $Venv "Scripts\python.exe") -m qwen_core demo @Rest
exit $LASTEXITCODE
