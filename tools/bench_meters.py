"""The meters of ``tools/bench.py``: peak memory (CUDA's allocator peak, or the sampled resident set on CPU) and a
step clock whose Lightning callbacks bracket every other callback's batch hooks."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
from typing import Any

class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator peak, or the sampled resident set size on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            gc.collect()
            if sys.platform.startswith("linux"):  # hand freed heap pages back, so earlier methods' peaks do not linger
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
                time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            self._thread.join()


class StepClock:
    """Seconds of each training batch after ``warmup`` untimed ones, and the peak memory over the timed ones. Its
    ``start`` callback goes first on the trainer and its ``stop`` callback last, so that every other callback's batch
    hooks (a history prefetch at batch start, an EMA update at batch end) are inside the timed step."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        import lightning.pytorch as pl

        clock = self

        class Start(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == warmup:
                    clock.memory = PeakMemory(cuda).__enter__()
                clock._sync()
                clock._t0 = time.perf_counter()

        class Stop(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                clock._sync()
                if batch_idx >= warmup:
                    clock.times.append(time.perf_counter() - clock._t0)

            def on_train_end(self, trainer, pl_module):
                if clock.memory is not None:
                    clock.memory.__exit__()

        self.cuda = cuda
        self.start, self.stop = Start(), Stop()
        self.times: list[float] = []
        self.memory: PeakMemory | None = None
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
