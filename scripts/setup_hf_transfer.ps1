<#
.SYNOPSIS
  Enable the Rust download accelerator for Hugging Face downloads: hf_xet, with HF_XET_HIGH_PERFORMANCE=1.
  Twin of scripts/setup_hf_transfer.sh.
.DESCRIPTION
  Usage: scripts\setup_hf_transfer.ps1 [-Python PATH] [-NoInstall]
    -Python PATH   interpreter to install into (default <repo>\.venv\Scripts\python.exe; use ComfyUI's python there)
    -NoInstall     only check and print what to set
  Why not hf_transfer: huggingface_hub >= 1.0 never imports hf_transfer; HF_HUB_ENABLE_HF_TRANSFER=1 only prints a
  FutureWarning. Its successor is hf_xet (a dependency of huggingface_hub >= 1.0 on most platforms), used whenever
  the server offers Xet storage. HF_XET_HIGH_PERFORMANCE=1 lets it use more threads and memory.
  WSL: inside WSL use bash scripts/setup_hf_transfer.sh and `export` the variable there.
#>
param(
    [string]$Python = "",
    [switch]$NoInstall
)
$ErrorActionPreference = "Stop"
# Messages to stderr and the same exit codes as the .sh twin (Write-Error would throw with code 1).
function Fail([string]$Message, [int]$Code = 2) { [Console]::Error.WriteLine($Message); exit $Code }
$Root = Split-Path -Parent $PSScriptRoot
if (-not $Python) {
    $Venv = if ($env:QWEN_VENV) { $env:QWEN_VENV } else { Join-Path $Root ".venv" }
    $Python = Join-Path $Venv "Scripts\python.exe"
}
if (-not (Test-Path $Python) -and -not (Get-Command $Python -ErrorAction SilentlyContinue)) {
    Fail "setup_hf_transfer: no Python at $Python; run scripts\setup.ps1 first or pass -Python" 2
}
& $Python -c "import hf_xet" 2>$null
if ($LASTEXITCODE -ne 0) {
    if ($NoInstall) {
        Fail "setup_hf_transfer: hf_xet is not installed in $Python (run without -NoInstall to install it)" 1
    }
    Write-Host "setup_hf_transfer: installing hf_xet into $Python"
    & $Python -m pip install --disable-pip-version-check -q "hf_xet>=1.1,<2"
    if ($LASTEXITCODE -ne 0) { throw "setup_hf_transfer: pip install hf_xet failed" }
}
& $Python -c "import importlib.metadata as md; print('setup_hf_transfer: hf_xet', md.version('hf_xet'), 'with huggingface_hub', md.version('huggingface_hub'))"
if ($env:HF_HUB_ENABLE_HF_TRANSFER) {
    Write-Host "setup_hf_transfer: note: HF_HUB_ENABLE_HF_TRANSFER is set but ignored by huggingface_hub >= 1.0 (remove it)"
}
Write-Host "setup_hf_transfer: hf_transfer is no longer used by huggingface_hub >= 1.0; hf_xet replaces it."
Write-Host "Set it for this window and for future ones:"
Write-Host '$env:HF_XET_HIGH_PERFORMANCE = "1"'
Write-Host '[Environment]::SetEnvironmentVariable("HF_XET_HIGH_PERFORMANCE", "1", "User")'
