"""walstate vs DBOS Transact on SQLite: the same workload, the same run, and import time.

Workload: N jobs (workflows) of M no-op steps, run one after another and by 8
threads at once. Each side runs in a child process of its own (DBOS is a
process-wide singleton) on a fresh SQLite file. If ``dbos`` is not installed
(``pip install -e '.[bench]'``), the suite says so and goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from .common import Figure, fresh_path, measure, report

JOBS = 40
STEPS = 10
THREADS = 8

_WALSTATE = r'''
import sys, threading, time
from pydantic import BaseModel
from walstate import Engine, Workflow
class C(BaseModel):
    pass
flow = Workflow("bench", context=C, phases=["p"])
for i in range({steps}):
    flow.step(phase="p", name=f"s{{i}}", after=[] if i == 0 else [f"s{{i-1}}"])(lambda ctx, step: None)
engine = Engine(sys.argv[1], workers=1)
engine.register(flow)
ids = [engine.submit("bench", C()) for _ in range({jobs})]
t = time.perf_counter()
if {threads} == 1:
    for j in ids:
        engine.run(j)
else:
    chunks = [ids[k::{threads}] for k in range({threads})]
    ts = [threading.Thread(target=lambda c=c: [engine.run(j) for j in c]) for c in chunks]
    [x.start() for x in ts]; [x.join() for x in ts]
print({jobs} * {steps} / (time.perf_counter() - t))
'''

_DBOS = r'''
import sys, threading, time, logging
from dbos import DBOS
logging.disable(logging.CRITICAL)
DBOS(config={{"name": "bench", "system_database_url": "sqlite:///" + sys.argv[1], "log_level": "ERROR"}})
@DBOS.step()
def noop(i):
    return i
@DBOS.workflow()
def wf():
    for i in range({steps}):
        noop(i)
DBOS.launch()
t = time.perf_counter()
if {threads} == 1:
    for _ in range({jobs}):
        wf()
else:
    per = {jobs} // {threads}
    ts = [threading.Thread(target=lambda: [wf() for _ in range(per)]) for _ in range({threads})]
    [x.start() for x in ts]; [x.join() for x in ts]
print({jobs} * {steps} / (time.perf_counter() - t))
DBOS.destroy()
'''


def _child(code: str, threads: int) -> float:
    src = code.format(jobs=JOBS, steps=STEPS, threads=threads)
    out = subprocess.run([sys.executable, "-c", src, fresh_path("peer")], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    return float(out.stdout.strip().splitlines()[-1])


def import_seconds(module: str, then: str = "") -> float:
    code = f"import time; t = time.perf_counter(); import {module}; {then or 'pass'}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def dbos_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import dbos"], capture_output=True).returncode == 0


def main() -> list[Figure]:
    figures: list[Figure] = []
    have_dbos = dbos_available()
    if not have_dbos:
        print("\nDBOS Transact is not installed (pip install -e '.[bench]'): peer figures skipped")
    for threads in (1, THREADS):
        label = "sequential" if threads == 1 else f"{threads} concurrent"
        ws, wss = measure(lambda: _child(_WALSTATE, threads), reps=3)
        if have_dbos:
            db, dbs = measure(lambda: _child(_DBOS, threads), reps=3)
            figures.append(Figure(f"DBOS steps/s, {label}", db, dbs, "steps/s"))
            figures.append(Figure(f"walstate sub-steps/s, {label}", ws, wss, "steps/s", f"DBOS, {label}", ws / db,
                                  ">= 20x"))
        else:
            figures.append(Figure(f"walstate sub-steps/s, {label}", ws, wss, "steps/s"))
    imp, imps = measure(lambda: import_seconds("walstate"))
    # The engine loads lazily; show the cost a program pays by its first Engine too.
    full, fulls = measure(lambda: import_seconds("walstate", "walstate.Engine"))
    if have_dbos:
        dimp, dimps = measure(lambda: import_seconds("dbos"))
        figures.append(Figure("import dbos", dimp * 1000, dimps, "ms"))
        figures.append(Figure("import walstate", imp * 1000, imps, "ms", "import dbos", imp / dimp, "<= 0.25x"))
        figures.append(Figure("import walstate + load the engine", full * 1000, fulls, "ms", "import dbos",
                              full / dimp))
    else:
        figures.append(Figure("import walstate", imp * 1000, imps, "ms"))
        figures.append(Figure("import walstate + load the engine", full * 1000, fulls, "ms"))
    report(f"walstate vs DBOS Transact on SQLite ({JOBS} jobs x {STEPS} no-op steps)", figures, "peers.json")
    return figures


if __name__ == "__main__":
    main()
