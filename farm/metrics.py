"""Prometheus metrics: the pool's, read from Redis at each scrape, and each process's own.

- The pool (`PoolCollector`, served by `farm dispatcher --metrics-port`, `farm serve`'s `/metrics`):
  items of unfinished jobs queued and running, runnable jobs, per lane and user; items settled
  since the pool began (a counter the workers raise in the same Lua call that counts an item,
  so a redelivered item is never counted twice); the items waiting in each lane (what an
  autoscaler reads: it falls as items are stored or failed and drops by a job's rest when it is
  cancelled); live workers.
- A worker (served by `farm worker --metrics-port`, gathered from its rendering processes with
  prometheus_client's multiprocess mode): images rendered, seconds per image by model and size,
  model loads and evictions, out-of-memory halvings, chunks handed back, redeliveries, its memory.
- Every process: store and broker errors by kind (retried or not).

Without prometheus_client installed (`pip install 'farm[metrics]'`) the process metrics are
inert and serving them says what to install.
"""

from __future__ import annotations

import os
import time

from farm import keys, pool

try:
    import prometheus_client as prom
except ImportError:  # a dispatcher host without the extra
    prom = None

#: Seconds per image: fast tiny models to large SDXL batches.
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class _Inert:
    def labels(self, *args, **kwargs) -> "_Inert":
        return self

    def inc(self, *args) -> None:
        pass

    def observe(self, *args) -> None:
        pass

    def set(self, *args) -> None:
        pass


def _metric(kind: str, name: str, documentation: str, labels: tuple[str, ...] = (), **options):
    if prom is None:
        return _Inert()
    return getattr(prom, kind)(name, documentation, labels, **options)


def _worker_metric(kind: str, name: str, documentation: str, labels: tuple[str, ...] = (), **options):
    """Kept out of the default registry, so a dispatcher does not serve empty worker families: a
    worker's rendering processes write them to files that `farm worker` serves (multiprocess)."""
    return _metric(kind, name, documentation, labels, registry=None, **options)


IMAGES = _worker_metric("Counter", "farm_worker_images", "Images rendered and stored by this worker", ("model",))
IMAGE_SECONDS = _worker_metric("Histogram", "farm_worker_image_seconds", "Rendering seconds per image",
                               ("model", "size"), buckets=SECONDS_BUCKETS)
MODEL_LOADS = _worker_metric("Counter", "farm_worker_model_loads", "Models loaded into this worker")
MODEL_EVICTIONS = _worker_metric("Counter", "farm_worker_model_evictions", "Models dropped to make room for another")
OOM_HALVINGS = _worker_metric("Counter", "farm_worker_oom_halvings", "Batches halved after running out of memory")
HANDED_BACK = _worker_metric("Counter", "farm_worker_chunks_handed_back",
                             "Chunks handed back (paused, or a transient error past its retries)", ("reason",))
REDELIVERIES = _worker_metric("Counter", "farm_worker_redeliveries", "Chunks this worker got that had started before")
MEMORY = _worker_metric("Gauge", "farm_worker_memory_bytes", "GPU memory allocated (CUDA) or resident memory (CPU)",
                        ("kind",), multiprocess_mode="liveall")
ERRORS = _metric("Counter", "farm_service_errors", "Store and broker errors by kind", ("service", "kind"))


def service_error(error: Exception) -> None:
    """Count a store or broker error by its class (StoreUnavailable, BrokerAccessDenied, ...)."""
    name = type(error).__name__
    ERRORS.labels("store" if name.startswith("Store") else "broker", name).inc()


def require() -> None:
    if prom is None:
        raise ValueError("metrics need prometheus_client: pip install 'farm[metrics]'")


class PoolCollector:
    """The pool's figures, read from Redis when Prometheus scrapes."""

    def __init__(self, client):
        self.redis = client

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from farm.jobs import JobBoard

        queued = GaugeMetricFamily("farm_items_queued", "Items of unfinished jobs not yet started",
                                   labels=("lane", "user"))
        running = GaugeMetricFamily("farm_items_running", "Items being rendered", labels=("lane", "user"))
        runnable = GaugeMetricFamily("farm_jobs_runnable", "Jobs that can be given work now", labels=("lane", "user"))
        waiting = GaugeMetricFamily("farm_lane_waiting_items", "Items of runnable jobs not yet stored or failed: "
                                    "what an autoscaler reads", labels=("lane",))
        board = JobBoard(self.redis)
        for lane in keys.LANES:
            ids = [j.decode() for j in self.redis.zrange(keys.lane_jobs(lane), 0, -1)]
            headers = [h for h in board.headers(ids) if h is not None and h.state.runnable]
            per_user: dict[str, list[int]] = {}
            lane_waiting = 0
            for header, live in zip(headers, board.running_counts([h.job_id for h in headers])):
                left = max(0, header.total - header.done - header.failed)
                counts = per_user.setdefault(header.user, [0, 0, 0])
                counts[0] += max(0, left - live)
                counts[1] += min(live, left)
                counts[2] += 1
                lane_waiting += left
            for user, (q, r, jobs) in sorted(per_user.items()):
                queued.add_metric((lane, user), q)
                running.add_metric((lane, user), r)
                runnable.add_metric((lane, user), jobs)
            waiting.add_metric((lane,), lane_waiting)
        settled = CounterMetricFamily("farm_items", "Items stored (done) or failed since the pool began",
                                      labels=("state", "lane", "user"))
        for field, count in sorted(self.redis.hgetall(keys.ITEM_STATS).items()):
            state, lane, user = field.decode().split("|", 2)
            settled.add_metric((state, lane, user), int(count))
        workers = GaugeMetricFamily("farm_workers", "Workers whose heartbeat is less than a minute old")
        now = time.time()
        workers.add_metric((), sum(1 for w in pool.read(self.redis, "") if now - w.heartbeat < 60))
        yield from (queued, running, runnable, waiting, settled, workers)


def pool_registry(client):
    require()
    registry = prom.CollectorRegistry()
    registry.register(PoolCollector(client))
    return registry


def serve_process_metrics(port: int, client=None) -> None:
    """This process's metrics (and the pool's, given Redis) on http://0.0.0.0:port/metrics."""
    require()
    registry = prom.REGISTRY
    if client is not None:
        registry.register(PoolCollector(client))
    prom.start_http_server(port, registry=registry)


def serve_worker_metrics(port: int) -> str:
    """For `farm worker`: a folder the rendering processes write their metrics to, gathered and
    served on `port`. Returns the folder (PROMETHEUS_MULTIPROC_DIR for the workers)."""
    import tempfile

    require()
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="farm-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    from prometheus_client import multiprocess

    registry = prom.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)
    prom.start_http_server(port, registry=registry)
    return folder
