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
# torch and torchvision as a matched pair (the edit models' Qwen2VLProcessor needs torchvision in transformers 5;
# a torchvision built for another torch fails to load): import both and run one torchvision op.
function Test-TorchPair {
    & $VPy -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)" 2>$null | Out-Null
    return ($LASTEXITCODE -eq 0)
}
$hasTorch = Test-TorchPair
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
    if ($build -eq "cpu") {
        $spec = @("torch==" + $(if ($env:QWEN_TORCH_VERSION) { $env:QWEN_TORCH_VERSION } else { "2.14.1" }),
                  "torchvision==" + $(if ($env:QWEN_TORCHVISION_VERSION) { $env:QWEN_TORCHVISION_VERSION } else { "0.29.1" }))
    } else {
        $spec = @($(if ($env:QWEN_TORCH_VERSION) { "torch==$($env:QWEN_TORCH_VERSION)" } else { "torch" }),
                  $(if ($env:QWEN_TORCHVISION_VERSION) { "torchvision==$($env:QWEN_TORCHVISION_VERSION)" } else { "torchvision" }))
    }
    Write-Host "setup: installing $($spec -join ' ') ($build build)"
    # On Windows, PyPI has only the CPU build; the CUDA builds live on PyTorch's index.
    & $VPy -m pip install --disable-pip-version-check -q --retries 1 @spec --extra-index-url "https://download.pytorch.org/whl/$build"
    if ($LASTEXITCODE -ne 0) { throw "setup: torch install failed" }
    if (-not (Test-TorchPair)) { throw "setup: torch and torchvision do not load together; set QWEN_TORCH_VERSION / QWEN_TORCHVISION_VERSION to a matching pair (2.14.1 / 0.29.1) and run with -Force" }
} else {
    Write-Host "setup: torch + torchvision already installed"
}

Write-Host "setup: installing requirements (exact versions from constraints.txt)"
$reqs = @("-r", (Join-Path $Root "requirements.txt"))
if ($Dev) { $reqs += @("-r", (Join-Path $Root "requirements-dev.txt")) }
& $VPy -m pip install --disable-pip-version-check -q @reqs -c (Join-Path $Root "constraints.txt")
if ($LASTEXITCODE -ne 0) { throw "setup: requirements install failed" }
Set-Content -Path $stampFile -Value $stamp
Write-Host "setup: done ($Venv)"
