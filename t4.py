import os, time, signal, glob
from common import cluster
from poolme_mp.dask import DaskPool
from poolme_mp import TaskError, WorkerCrashedError
D = "/tmp/breaker3/t/att"
def killer(x):
    open(f"{D}/{x}-{time.time_ns()}", "w").close()
    if x == 5: os.kill(os.getpid(), 9)
    return x
def flaky(x):
    n = len(glob.glob(f"{D}/f{x}-*"))
    open(f"{D}/f{x}-{time.time_ns()}", "w").close()
    if n < 2: raise ValueError(f"attempt {n}")
    return x
if __name__ == "__main__":
    import shutil; shutil.rmtree(D, ignore_errors=True); os.makedirs(D)
    import dask
    dask.config.set({"distributed.scheduler.allowed-failures": 0})
    c, client = cluster()
    pool = DaskPool(client, chunksize=4, max_attempts=3, initial_delay=0.05)
    r = pool.process(flaky, range(6), timeout=60)
    print("flaky", r, {x: len(glob.glob(f"{D}/f{x}-*")) for x in range(6)})
    t = time.monotonic()
    try:
        print(pool.process(killer, range(8), timeout=80, return_exceptions=True))
    except Exception as e: print("raised", type(e).__name__, e)
    print("took", round(time.monotonic()-t, 1))
    runs = {}
    for f in glob.glob(f"{D}/[0-9]*"):
        k = int(os.path.basename(f).split("-")[0]); runs[k] = runs.get(k, 0) + 1
    print("runs per item", dict(sorted(runs.items())))
    pool.shutdown(); client.close(); c.close()
