#!/usr/bin/env python3
"""Throughput of qwen_core.download vs plain huggingface_hub.snapshot_download, same loopback server, same run.

Generates a repo of a few large random files, serves it with the Hub stand-in from tests/hub_server.py on
127.0.0.1, and downloads it alternately with both clients (ours, hub, hub, ours, ...) into fresh folders so
neither always gets the warmer page cache. Both use 8 parallel workers; ours also sha256-verifies every LFS
file, huggingface_hub checks sizes only.

    python bench/download_bench.py --files 4 --size-mb 256 --rounds 2 [--write-results]

--write-results appends a section to bench/RESULTS.md under "## Downloads".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ["HF_HUB_OFFLINE"] = "0"  # loopback only; must be set before huggingface_hub is imported
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


REPO = "bench/large-files"


def make_files(folder: Path, count: int, size: int) -> dict[str, Path]:
    files = {}
    for i in range(count):
        path = folder / f"transformer/diffusion_pytorch_model-{i + 1:05d}-of-{count:05d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            left = size
            while left:
                block = os.urandom(min(16 << 20, left))
                f.write(block)
                left -= len(block)
        files[path.relative_to(folder).as_posix()] = path
    (folder / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    files["model_index.json"] = folder / "model_index.json"
    return files


def run_ours(url: str, out: Path, workers: int, allow: str | None = None, pipeline_hash: bool = True) -> float:
    from qwen_core.download import DownloadOptions, HttpConfig, download_repo, resolve_endpoint

    t0 = time.perf_counter()
    download_repo(REPO, DownloadOptions(endpoint=resolve_endpoint(url), local_dir=out, workers=workers, token=False,
                                        allow_patterns=allow, http=HttpConfig(pipeline_hash=pipeline_hash)))
    return time.perf_counter() - t0


def run_ours_inline(url: str, out: Path, workers: int, allow: str | None = None) -> float:
    return run_ours(url, out, workers, allow, pipeline_hash=False)


def run_hub(url: str, out: Path, workers: int, allow: str | None = None) -> float:
    from huggingface_hub import snapshot_download

    t0 = time.perf_counter()
    snapshot_download(REPO, endpoint=url, local_dir=out, max_workers=workers, token=False, allow_patterns=allow)
    return time.perf_counter() - t0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.platform()}"


def versions() -> str:
    import huggingface_hub
    import requests
    import urllib3

    return (f"python {platform.python_version()}, huggingface_hub {huggingface_hub.__version__}, "
            f"requests {requests.__version__}, urllib3 {urllib3.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="each client runs this many times (alternating)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--with-inline-hash", action="store_true",
                        help="also time our engine hashing inline in the download thread (the pre-fix design)")
    parser.add_argument("--write-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    # Import both clients before any timing, so neither run pays for module imports.
    import huggingface_hub  # noqa: F401

    import qwen_core.download  # noqa: F401

    scratch = Path(tempfile.mkdtemp(prefix="qwen-dl-bench-", dir=args.dir))
    try:
        files = make_files(scratch / "src", args.files, args.size_mb * 1_000_000)
        total = sum(p.stat().st_size for p in files.values())
        order = [("qwen_core.download", run_ours), ("snapshot_download", run_hub)]
        if args.with_inline_hash:
            order.append(("ours, inline sha256", run_ours_inline))
        times: dict[str, list[float]] = {name: [] for name, _ in order}
        cpu: dict[str, list[float]] = {name: [] for name in times}
        # The server runs in its own process: in-process it would fight the clients for the GIL.
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_server.py"), str(scratch / "src"),
                                   "--repo", REPO], stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split(" at ")[1].split()[0]
            # Untimed full warm-up of every client: lazy imports, connection setup and the kernel's first page-cache
            # reclaim (charged to whoever writes the first GB, ~1 CPU-s here) land here, not in a timed run.
            os.sync()
            for name, fn in order:
                fn(url, scratch / f"warmup-{name}", args.workers)
                shutil.rmtree(scratch / f"warmup-{name}")
            for r in range(args.rounds):
                for name, fn in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
                    out = scratch / f"out-{name}-{r}"
                    _stats(url, "_reset")
                    cpu0 = _cpu()
                    seconds = fn(url, out, args.workers)
                    cpu[name].append(_cpu() - cpu0)
                    served = _stats(url, "_stats")["bytes_served"]
                    assert served == total, f"{name} fetched {served} bytes, expected {total}"
                    times[name].append(seconds)
                    print(f"round {r + 1} {name:20s} {seconds:6.2f} s  {total / seconds / 1e6:7.1f} MB/s  "
                          f"client CPU {cpu[name][-1]:.2f} s", flush=True)
                    shutil.rmtree(out)
        finally:
            server.terminate()
            server.wait(10)
        report = render(args, total, times, cpu)
        print(report)
        if args.write_results:
            write_results(report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stats(url: str, what: str) -> dict:
    with urllib.request.urlopen(f"{url}/{what}", timeout=10) as resp:
        return json.loads(resp.read())


def render(args: argparse.Namespace, total: int, times: dict[str, list[float]], cpu: dict[str, list[float]]) -> str:
    cmd = f"python bench/download_bench.py --files {args.files} --size-mb {args.size_mb} --rounds {args.rounds} " \
          f"--workers {args.workers}" + (" --with-inline-hash" if args.with_inline_hash else "")
    lines = [
        f"### Loopback throughput, {args.files} x {args.size_mb} MB ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- Command: `{cmd}`",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}",
        f"- Load average (1 min) at the end of the run: {os.getloadavg()[0]:.1f} (other jobs share this machine); niceness "
        f"{os.nice(0)}.",
        "- Server: tests/hub_server.py (threaded, Python, its own process) on 127.0.0.1, the same instance for "
        "both clients; "
        f"{args.workers} workers each; the order rotates each round so no client always goes first.",
        "",
        "| client | runs (s) | best s | median s | median MB/s | client CPU s (median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {', '.join(f'{t:.2f}' for t in ts)} | {min(ts):.2f} | {med:.2f} | {total / med / 1e6:.0f} | "
                     f"{statistics.median(cpu[name]):.2f} |")
    ours, hub = statistics.median(times["qwen_core.download"]), statistics.median(times["snapshot_download"])
    lines += ["", f"Ratio (ours / snapshot_download throughput, medians): {hub / ours:.2f}x. Ours includes the "
              "sha256 verification of every file (on a helper thread, overlapping the next read); "
              "snapshot_download checks sizes only.", ""]
    return "\n".join(lines)


def write_results(report: str) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if "## Downloads" not in text:
        text = text.rstrip() + "\n\n## Downloads\n\n"
    # Insert right after the "## Downloads" section's existing entries (before the next "## " heading).
    head, _, rest = text.partition("## Downloads\n")
    nxt = rest.find("\n## ")
    body, tail = (rest, "") if nxt < 0 else (rest[: nxt + 1], rest[nxt + 1 :])
    path.write_text(head + "## Downloads\n" + body.rstrip() + "\n\n" + report + "\n" + tail)


if __name__ == "__main__":
    sys.exit(main())
