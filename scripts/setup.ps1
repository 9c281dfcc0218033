<#
.SYNOPSIS
  Create (or refresh) the repo's own virtualenv and install what the pack needs. Twin of scripts/setup.sh.
.DESCRIPTION
  Idempotent: a second run with unchanged requirements returns in about a second.
  Usage: scripts\setup.ps1 [-Dev] [-Force] [-Cuda auto|cpu|cu126|cu128|cu130]
    -Dev    also install test/lint tools (requirements-dev.txt)
    -Force  reinstall even if nothing changed
    -Cuda   which torch build to install (default: auto = CUDA wheel if nvidia-smi works, else CPU)
  Env: QWEN_VENV (default <repo>\.venv), QWEN_PYTHON (interpreter to build the venv with),
       QWEN_TORCH_VERSION (default 2.13.0 on CPU; newest matching release for CUDA)
  WSL: inside WSL use the .sh scripts instead (bash scripts/setup.sh); the GPU works there with the Windows
  NVIDIA driver, and Linux wheels are used.
#>
param(
    [switch]$Dev,
    [switch]$Force,
    [ValidateSet("auto", "cpu", "cu126", "cu128", "cu130")][string]$Cuda = "auto"
)
$ErrorActionPreference = "Stop"
$Root = Split-Path -Parent $PSScriptRoot
$Venv = if ($env:QWEN_VENV) { $env:QWEN_VENV } else { Join-Path $Root ".venv" }
$VPy = Join-Path $Venv "Scripts\python.exe"

function Find-Python {
    foreach ($candidate in @($env:QWEN_PYTHON, "py -3.12", "py -3.11", "py -3.10", "python")) {
        if (-not $candidate) { continue }
        $parts = $candidate.Split(" ")
        try {
            & $parts[0] @($parts[1..9] | Where-Object { $_ }) -c "import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 14) else 1)" 2>$null
            if ($LASTEXITCODE -eq 0) { return $parts }
        } catch { }
    }
    throw "setup: no Python 3.10-3.13 found; install one from python.org or set QWEN_PYTHON"
}

if (-not (Test-Path $VPy)) {
    $py = Find-Python
    Write-Host "setup: creating virtualenv $Venv"
    & $py[0] @($py[1..9] | Where-Object { $_ }) -m venv $Venv
    if ($LASTEXITCODE -ne 0) { throw "setup: venv creation failed" }
}

# The stamp records what was installed, so an unchanged second run does nothing.
$stampInput = (Get-Content (Join-Path $Root "requirements.txt") -Raw) + (Get-Content (Join-Path $Root "constraints.txt") -Raw)
if ($Dev) { $stampInput += (Get-Content (Join-Path $Root "requirements-dev.txt") -Raw) }
$stampInput += "cuda=$Cuda"
$sha = [System.Security.Cryptography.SHA256]::Create()
$stamp = ([BitConverter]::ToString($sha.ComputeHash([Text.Encoding]::UTF8.GetBytes($stampInput))) -replace "-", "").Substring(0, 16).ToLower()
$stampFile = Join-Path $Venv (".qwen_setup_" + [int][bool]$Dev)
& $VPy -c "import torch" 2>$null
$hasTorch = ($LASTEXITCODE -eq 0)
if (-not $Force -and $hasTorch -and (Test-Path $stampFile) -and ((Get-Content $stampFile -Raw).Trim() -eq $stamp)) {
    Write-Host "setup: $Venv is up to date"
    exit 0
}

function Get-TorchBuild {
    if ($Cuda -ne "auto") { return $Cuda }
    $smi = Get-Command nvidia-smi -ErrorAction SilentlyContinue
    if (-not $smi) { return "cpu" }
    $out = (& nvidia-smi 2>$null) -join "`n"
    if ($out -match "CUDA Version:\s*(\d+)\.(\d+)") {
        $v = [int]$Matches[1] * 10 + [int]$Matches[2]
        if ($v -ge 130) { return "cu130" } elseif ($v -ge 128) { return "cu128" } else { return "cu126" }
    }
    return "cpu"
}

if ($Force -or -not $hasTorch) {
    $build = Get-TorchBuild
    $spec = if ($build -eq "cpu") { "torch==" + ($(if ($env:QWEN_TORCH_VERSION) { $env:QWEN_TORCH_VERSION } else { "2.13.0" })) }
            elseif ($env:QWEN_TORCH_VERSION) { "torch==$($env:QWEN_TORCH_VERSION)" } else { "torch" }
    Write-Host "setup: installing $spec ($build build)"
    # On Windows, PyPI has only the CPU build; the CUDA builds live on PyTorch's index.
    & $VPy -m pip install --disable-pip-version-check -q --retries 1 $spec --extra-index-url "https://download.pytorch.org/whl/$build"
    if ($LASTEXITCODE -ne 0) { throw "setup: torch install failed" }
} else {
    Write-Host "setup: torch already installed"
}

Write-Host "setup: installing requirements (exact versions from constraints.txt)"
$reqs = @("-r", (Join-Path $Root "requirements.txt"))
if ($Dev) { $reqs += @("-r", (Join-Path $Root "requirements-dev.txt")) }
& $VPy -m pip install --disable-pip-version-check -q @reqs -c (Join-Path $Root "constraints.txt")
if ($LASTEXITCODE -ne 0) { throw "setup: requirements install failed" }
Set-Content -Path $stampFile -Value $stamp
Write-Host "setup: done ($Venv)"
