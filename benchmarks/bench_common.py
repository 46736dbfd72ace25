"""What every benchmark here shares: the offline environment, this checkout on ``sys.path``, threads, timing,
CPU accounting and peak memory. Importing it needs no torch (the TRL venv of ``trl_side_by_side.py`` imports it too);
the functions that measure a device import torch themselves.

    set_threads(n)            torch's intra- and inter-op threads (``--threads``; 1 on a shared machine)
    timed(fn, repeats, ...)   seconds of each call after untimed warmup calls (CUDA synchronised)
    cpu_seconds()             (busy CPU seconds of the machine, this process's): the load other processes added
    peak_rss_mib()            this process's high-water resident memory (VmHWM); MemoryMark: peak over a stretch
    machine_info(args)        versions, device, threads, CPU model
"""

from __future__ import annotations

import cProfile
import io
import os
import platform
import pstats
import resource
import shlex
import sys
import time
from pathlib import Path

# No hub access: everything is built locally. Set before transformers is imported.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
for _var, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_var, _value)

# Run from a checkout without installing: this checkout's rlhf_scratch comes first.
CHECKOUT = Path(__file__).resolve().parents[1]
if str(CHECKOUT) not in sys.path:
    sys.path.insert(0, str(CHECKOUT))


def set_threads(threads: int) -> None:
    """torch's intra-op and (where still allowed) inter-op threads."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only before the first parallel work
        pass


def add_threads_argument(parser, default: int | None = None) -> None:
    """``--threads N`` on an argparse parser."""
    parser.add_argument("--threads", type=int, default=default,
                        help="torch CPU threads (default: torch's own; use 1 on a shared machine)")


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads the work itself."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    """This process's high-water mark of resident memory, in MiB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: a child's starts at its parent's resident size at fork and survives ``exec``, so
    a fresh measuring process would report at least the orchestrator's size (before 2026-11-29 the figures here did:
    the GPT-2 "after imports" baseline read ~1.1 GB where the imports take ~0.55 GB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine from /proc/stat, CPU seconds of this process).

    Their difference over the run is the CPU time other processes took: on a shared
    machine it shows whether the timings were taken on a quiet machine. (Child
    processes count as this process once they have exited.)
    """
    own = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own
    except (OSError, ValueError, IndexError):
        return float("nan"), own


def others_cpu_share(busy: float, own: float, wall: float) -> float:
    """The share of the usable CPUs that other processes used over ``wall`` seconds (``cpu_seconds`` differences):
    near 0 on a quiet machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0.0, busy - own) / (wall * cpus) if wall > 0 else float("nan")


class MemoryMark:
    """Peak memory of a stretch of work: CUDA peak allocated, or the process's peak RSS on CPU."""

    def __init__(self, device: str):
        import torch

        self.device = device
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        else:
            self.start = peak_rss_mib()

    def read(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            return {"kind": "cuda_max_allocated", "peak_mib": peak, "increase_mib": peak - self.start}
        peak = peak_rss_mib()
        return {"kind": "cpu_peak_rss", "peak_mib": peak, "increase_mib": peak - self.start}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def timed(fn, repeats: int, warmup: int, device: str) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def prepare_process(args) -> None:
    """Thread count, quiet progress bars and the heavy imports, before any memory baseline."""
    if args.threads:
        set_threads(args.threads)
    import transformer_lens.model_bridge  # noqa: F401
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
    transformers.utils.logging.set_verbosity_error()


def machine_info(args) -> dict:
    """Versions, device, threads and CPU of this run (``args.device``), for the report."""
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"
    info = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformer_lens": version("transformer-lens"),
        "transformers": version("transformers"),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu,
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def profiled(fn, heading: str, top: int, orders: tuple[str, ...] = ("tottime",)) -> str:
    """cProfile of one call of ``fn``: the ``top`` functions in each sort order of ``orders``, under ``heading``."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    for order in orders:
        stats.sort_stats(order).print_stats(top)
    return f"--- cProfile: {heading} ---\n" + stream.getvalue()
