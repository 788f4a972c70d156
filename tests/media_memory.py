"""Peak memory of media loads, for tests/test_media_limits.py: `python tests/media_memory.py JOBS`, where JOBS is a
JSON list of jobs, each [kind, *arguments]:

    ["video", PATH, NFRAMES]                 load_video(PATH, nframes=NFRAMES)
    ["pictures", PATH, COUNT, MAX_PIXELS]    QwenVLImageProcessor(max_pixels=MAX_PIXELS)(images=[PATH] * COUNT)
    ["fetch", URL]                           load_image(URL) under the default FetchPolicy

Prints one JSON line per job: baseline_mb (peak RSS of this process after its imports), peak_mb (what the peak RSS
of a fresh process running the job would be: the baseline plus the job's growth), growth_mb, output_mb (the
result's arrays), seconds, and error (the exception, if the job raised one).

The baseline is read from /proc (VmHWM), not from resource.getrusage: across exec, Linux carries the parent's peak
into ru_maxrss, so in a process started by pytest it would report pytest's memory.

The imports (torch, transformers: about 9 s of CPU) are paid once: each job runs in a process forked from this one,
which starts with its own peak RSS (resource.getrusage counts it per process) and reports its growth over its RSS
at the fork. image_processing_qwenvl is imported from PYTHONPATH (the repository root), so the same script measures
any version of the module. Each job's address space is capped at its start plus MEDIA_MEMORY_HEADROOM_GB (default
6), so that a version without memory bounds fails with a MemoryError instead of taking the machine's memory.
"""

import json
import os
import resource
import sys
import time

import numpy as np

import image_processing_qwenvl as media

HEADROOM_GB = float(os.environ.get("MEDIA_MEMORY_HEADROOM_GB", "6"))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def cap_address_space():
    limit = status_kb("VmSize") * 1024 + int(HEADROOM_GB * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run(kind, *args) -> list:
    """The job's result arrays."""
    if kind == "video":
        frames, _ = media.load_video(args[0], nframes=int(args[1]))
        return [frames]
    if kind == "pictures":
        processor = media.QwenVLImageProcessor(max_pixels=int(args[2]))
        out = processor(images=[args[0]] * int(args[1]))
        return [out["pixel_values"], out["image_grid_thw"]]
    if kind == "fetch":
        return [np.asarray(media.load_image(args[0]))]
    raise ValueError(f"unknown job kind {kind!r}")


def measure(job, baseline: float, report_fd: int):
    """Run one job in this (forked) process and write its report to ``report_fd``."""
    start_mb = status_kb("VmRSS") / 1024
    cap_address_space()
    start, outputs, error = time.perf_counter(), [], None
    try:
        outputs = run(*job)
    except Exception as err:  # reported to the test, which checks the kind and the message
        error = f"{type(err).__name__}: {err}"[:500]
    growth = max(0.0, peak_mb() - start_mb)
    report = dict(
        job=job,
        baseline_mb=baseline,
        peak_mb=baseline + growth,
        growth_mb=growth,
        output_mb=sum(array.nbytes for array in outputs) / 2**20,
        seconds=time.perf_counter() - start,
        error=error,
    )
    os.write(report_fd, (json.dumps(report) + "\n").encode())


def main(jobs):
    baseline = status_kb("VmHWM") / 1024
    for job in jobs:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                measure(job, baseline, sys.stdout.fileno())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
