<#
.SYNOPSIS
  Start ComfyUI from COMFYUI_DIR with this pack linked into its custom_nodes, in the background.
  Twin of scripts/launch_ui.sh.
.DESCRIPTION
  Usage: scripts\launch_ui.ps1 [-Listen HOST] [-Port N] [-Cpu] [-Foreground] [-- EXTRA_COMFYUI_ARGS...]
    -Listen HOST   address to listen on (default 127.0.0.1: only this machine; 0.0.0.0 exposes it to the network)
    -Port N        port (default 8188)
    -Cpu           pass --cpu to ComfyUI (no GPU)
    -Foreground    run in this window instead of the background (Ctrl+C stops it)
  Env: COMFYUI_DIR (required: the ComfyUI folder holding main.py; for the portable build that is
       ComfyUI_windows_portable\ComfyUI), COMFYUI_PYTHON (interpreter; default <repo>\.venv\Scripts\python.exe;
       for the portable build use ComfyUI_windows_portable\python_embeded\python.exe), QWEN_REPORTS_DIR
       (default <repo>\reports: comfyui.pid and comfyui.log are written there).
  The pack is linked with a directory junction (no administrator rights needed).
  WSL: inside WSL use bash scripts/launch_ui.sh with a Linux ComfyUI checkout; open the printed URL in Windows.
#>
param(
    [string]$Listen = "127.0.0.1",
    [ValidateRange(1, 65535)][int]$Port = 8188,
    [switch]$Cpu,
    [switch]$Foreground,
    [Parameter(ValueFromRemainingArguments = $true)][string[]]$Rest
)
$ErrorActionPreference = "Stop"
# Messages to stderr and the same exit codes as the .sh twin (Write-Error would throw with code 1).
function Fail([string]$Message, [int]$Code = 2) { [Console]::Error.WriteLine($Message); exit $Code }
$Root = Split-Path -Parent $PSScriptRoot

if (-not $env:COMFYUI_DIR) {
    Fail "launch_ui: COMFYUI_DIR is not set. Point it at your ComfyUI folder, e.g. `$env:COMFYUI_DIR = 'C:\ComfyUI'" 2
}
$Comfy = $env:COMFYUI_DIR
if (-not (Test-Path (Join-Path $Comfy "main.py"))) {
    Fail "launch_ui: $Comfy has no main.py; COMFYUI_DIR must be the ComfyUI folder itself." 2
}
$Venv = if ($env:QWEN_VENV) { $env:QWEN_VENV } else { Join-Path $Root ".venv" }
$Py = if ($env:COMFYUI_PYTHON) { $env:COMFYUI_PYTHON } else { Join-Path $Venv "Scripts\python.exe" }
if (-not (Test-Path $Py) -and -not (Get-Command $Py -ErrorAction SilentlyContinue)) {
    Fail "launch_ui: no Python at $Py; run scripts\setup.ps1 or set COMFYUI_PYTHON to ComfyUI's interpreter." 2
}
$Reports = if ($env:QWEN_REPORTS_DIR) { $env:QWEN_REPORTS_DIR } else { Join-Path $Root "reports" }
New-Item -ItemType Directory -Force -Path $Reports | Out-Null
$PidFile = Join-Path $Reports "comfyui.pid"
$LogFile = Join-Path $Reports "comfyui.log"

if (Test-Path $PidFile) {
    $old = (Get-Content $PidFile -Raw).Trim()
    if ($old -and (Get-Process -Id $old -ErrorAction SilentlyContinue)) {
        Write-Host "launch_ui: ComfyUI already running (PID $old); use scripts\safe_restart.ps1 to restart it."
        exit 0
    }
}

# Link this checkout into custom_nodes (a junction: edits here are live after a restart).
$Nodes = Join-Path $Comfy "custom_nodes"
New-Item -ItemType Directory -Force -Path $Nodes | Out-Null
$Link = Join-Path $Nodes "comfyui-qwen-image"
if (Test-Path $Link) {
    $item = Get-Item $Link -Force
    $target = if ($item.LinkType) { (Resolve-Path ($item.Target | Select-Object -First 1)).Path } else { $null }
    if (-not $target) {
        Fail "launch_ui: $Link exists and is not a link to this checkout; remove or rename it first." 2
    }
    if ($target.TrimEnd("\") -ne (Resolve-Path $Root).Path.TrimEnd("\")) {
        Fail "launch_ui: $Link links to another copy of the pack; remove it first (two copies would clash)." 2
    }
} else {
    New-Item -ItemType Junction -Path $Link -Target $Root | Out-Null
    Write-Host "launch_ui: linked $Link -> $Root"
}

$args_ = @("main.py", "--listen", $Listen, "--port", "$Port")
if ($Cpu) { $args_ += "--cpu" }
if ($Rest) { $args_ += @($Rest | Where-Object { $_ -ne "--" }) }
if ($Foreground) {
    Set-Content -Path $PidFile -Value $PID
    Write-Host "launch_ui: ComfyUI on http://${Listen}:$Port (PID $PID, foreground)"
    Push-Location $Comfy
    try { & $Py @args_ } finally { Pop-Location }
    exit $LASTEXITCODE
}
$proc = Start-Process -FilePath $Py -ArgumentList $args_ -WorkingDirectory $Comfy -PassThru -WindowStyle Hidden `
    -RedirectStandardOutput $LogFile -RedirectStandardError "$LogFile.err"
Set-Content -Path $PidFile -Value $proc.Id
Start-Sleep -Seconds 1
if ($proc.HasExited) {
    Remove-Item $PidFile -ErrorAction SilentlyContinue
    Fail "launch_ui: ComfyUI exited at once; see $LogFile and $LogFile.err" 1
}
Write-Host "launch_ui: ComfyUI starting on http://${Listen}:$Port (PID $($proc.Id), log $LogFile)"
