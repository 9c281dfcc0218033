"""Run the file jobs of one download on a thread pool; the caller's thread polls cancel and reports progress.

Both callbacks run on the caller's thread (the workers only set/read a threading.Event), so a ComfyUI
progress hook may raise to cancel; partial files stay for the next run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from qwen_core.download.job import Job
from qwen_core.download.plan import DownloadPlan
from qwen_core.download.types import DownloadHooks, DownloadProgress, FileOutcome, RemoteFile
from qwen_core.errors import DownloadCancelled

FetchOne = Callable[[RemoteFile, Job], FileOutcome]


def run_workers(plan: DownloadPlan, job: Job, fetch_one: FetchOne, workers: int,
                hooks: DownloadHooks) -> tuple[list[FileOutcome], BaseException | None]:
    """(outcomes, first error): one fatal error stops the others; their partials stay for resume."""
    # Largest first: the long poles start at once, small files fill the gaps.
    files = sorted(plan.files, key=lambda f: -f.size)
    meter = Meter(plan, job)
    outcomes: list[FileOutcome] = []
    first_error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qwen-download") as pool:
        pending: set[Future] = {pool.submit(fetch_one, f, job) for f in files}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                for fut in done:
                    err = fut.exception()
                    if err is None:
                        outcomes.append(fut.result())
                        continue
                    if first_error is None or _is_cancel(first_error):
                        first_error = err
                    job.cancel.set()
                if first_error is None:
                    if hooks.should_cancel is not None and hooks.should_cancel():
                        job.cancel.set()
                    meter.tick(hooks.progress, len(outcomes), final=not pending)
        except BaseException as err:  # Ctrl-C, or a progress hook raising (ComfyUI's interrupt)
            job.cancel.set()
            first_error = first_error or err
            wait(pending)  # workers see the cancel flag within one chunk and keep their partials
    return outcomes, first_error


def _is_cancel(err: BaseException) -> bool:
    return isinstance(err, DownloadCancelled)


class Meter:
    """Progress snapshots with a ~5 s moving-window speed."""

    def __init__(self, plan: DownloadPlan, job: Job) -> None:
        self.plan, self.job = plan, job
        self.samples: deque[tuple[float, int]] = deque()
        self.last_emit = 0.0

    def tick(self, progress: Callable[[DownloadProgress], None] | None, files_done: int, final: bool) -> None:
        now = time.monotonic()
        self.samples.append((now, self.job.fetched_bytes))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5.0:
            self.samples.popleft()
        if progress is None or (not final and now - self.last_emit < 0.25):
            return
        self.last_emit = now
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        speed = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        done = min(self.job.done_bytes, self.plan.total_bytes)
        eta = (self.plan.total_bytes - done) / speed if speed > 0 else None
        phase = "done" if final else "downloading"
        progress(DownloadProgress(self.plan.repo_id, phase, done, self.plan.total_bytes, files_done,
                                  len(self.plan.files), speed, eta))
