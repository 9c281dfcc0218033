<#
.SYNOPSIS
  Restart the ComfyUI that scripts\launch_ui.ps1 started. Twin of scripts/safe_restart.sh.
.DESCRIPTION
  Stops it by its recorded PID gracefully (taskkill without /F asks it to close; Stop-Process -Force after the
  timeout), waits until nvidia-smi no longer lists that PID (its VRAM is released; skipped without nvidia-smi),
  then starts it again via launch_ui.ps1.
  Usage: scripts\safe_restart.ps1 [-Timeout SECONDS] [-Listen HOST] [-Port N] [-Cpu]
    -Timeout SECONDS  how long to wait for a graceful exit, and then for the GPU memory (default 30)
    -Listen HOST      passed to launch_ui (default 127.0.0.1)
    -Port N           passed to launch_ui (default 8188)
    -Cpu              passed to launch_ui
  Env: COMFYUI_DIR (required), COMFYUI_PYTHON, QWEN_REPORTS_DIR (where comfyui.pid lives), as for launch_ui.
  Only the recorded PID is stopped, and only if it is a python process running main.py.
  WSL: inside WSL use bash scripts/safe_restart.sh.
#>
param(
    [ValidateRange(1, 3600)][int]$Timeout = 30,
    [string]$Listen = "127.0.0.1",
    [ValidateRange(1, 65535)][int]$Port = 8188,
    [switch]$Cpu
)
$ErrorActionPreference = "Stop"
# Messages to stderr and the same exit codes as the .sh twin (Write-Error would throw with code 1).
function Fail([string]$Message, [int]$Code = 2) { [Console]::Error.WriteLine($Message); exit $Code }
$Root = Split-Path -Parent $PSScriptRoot
if (-not $env:COMFYUI_DIR) {
    Fail "safe_restart: COMFYUI_DIR is not set. Point it at your ComfyUI folder, e.g. `$env:COMFYUI_DIR = 'C:\ComfyUI'" 2
}
$Reports = if ($env:QWEN_REPORTS_DIR) { $env:QWEN_REPORTS_DIR } else { Join-Path $Root "reports" }
$PidFile = Join-Path $Reports "comfyui.pid"
$procId = if (Test-Path $PidFile) { (Get-Content $PidFile -Raw).Trim() } else { "" }

function Test-GpuHolds([string]$Id) {
    if (-not (Get-Command nvidia-smi -ErrorAction SilentlyContinue)) { return $false }
    $ids = & nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>$null
    return [bool]($ids | Where-Object { $_.Trim() -eq $Id })
}

$proc = if ($procId) { Get-Process -Id $procId -ErrorAction SilentlyContinue } else { $null }
if ($proc) {
    # Guard against a recycled PID belonging to something else.
    $cmd = (Get-CimInstance Win32_Process -Filter "ProcessId = $procId").CommandLine
    if ($cmd -notmatch "main\.py") {
        Fail "safe_restart: PID $procId from $PidFile is not a ComfyUI main.py; not touching it." 1
    }
    Write-Host "safe_restart: stopping ComfyUI (PID $procId)"
    # taskkill without /F asks the process to close; a windowless python cannot be asked, and then
    # taskkill fails at once: force it right away rather than waiting for nothing.
    & taskkill /PID $procId 2>$null | Out-Null
    if ($LASTEXITCODE -ne 0) {
        Write-Host "safe_restart: ComfyUI cannot be asked to close (no window); stopping it"
        Stop-Process -Id $procId -Force -ErrorAction SilentlyContinue
        $proc.WaitForExit()
    } elseif (-not $proc.WaitForExit($Timeout * 1000)) {
        Write-Host "safe_restart: still running after ${Timeout}s; forcing it"
        Stop-Process -Id $procId -Force -ErrorAction SilentlyContinue
        $proc.WaitForExit()
    }
    if (Get-Command nvidia-smi -ErrorAction SilentlyContinue) {
        $deadline = (Get-Date).AddSeconds($Timeout)
        while ((Test-GpuHolds $procId) -and (Get-Date) -lt $deadline) { Start-Sleep -Milliseconds 500 }
        if (Test-GpuHolds $procId) { Write-Warning "safe_restart: the GPU still lists PID $procId; starting anyway" }
        else { Write-Host "safe_restart: GPU memory of PID $procId released" }
    } else {
        Write-Host "safe_restart: no nvidia-smi; skipping the GPU memory check"
    }
    Remove-Item $PidFile -ErrorAction SilentlyContinue
} else {
    Write-Host "safe_restart: no running ComfyUI recorded in $PidFile; just starting it"
}
$launch = @{ Listen = $Listen; Port = $Port }
if ($Cpu) { $launch.Cpu = $true }
& (Join-Path $PSScriptRoot "launch_ui.ps1") @launch
exit $LASTEXITCODE
