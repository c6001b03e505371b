"""Where a fresh process's `kernl.runtime.load()` spends its time (cProfile, cumulative).

    python benchmarks/profile_load.py ARTIFACT [--generate]
Prints import, load and first-call wall times, then the 30 most expensive calls of load."""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

import kernl.runtime  # noqa: E402

t_import = time.perf_counter() - t0
profile = cProfile.Profile()
t1 = time.perf_counter()
profile.enable()
model = kernl.runtime.load(sys.argv[1])
profile.disable()
t_load = time.perf_counter() - t1
t2 = time.perf_counter()
if "--generate" in sys.argv:
    model.generate(torch.randint(0, 1000, (1, 100)), max_new_tokens=1)
else:
    b = model.buckets[0]
    model(torch.ones(b.batch, b.seq, dtype=torch.long))
if torch.cuda.is_available():
    torch.cuda.synchronize()
t_first = time.perf_counter() - t2
print(f"import {t_import:.3f} s, load {t_load:.3f} s, first call {t_first:.3f} s")
pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
