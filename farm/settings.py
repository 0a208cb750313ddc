"""One settings object, read from the environment once, at the edge.

boto3 reads its own variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, profiles); farm passes them through
untouched, so MinIO, R2, SeaweedFS and AWS all work the same way. Everything
farm adds has a `FARM_` prefix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from farm.errors import SettingMissing


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "farm"


@dataclass(frozen=True)
class Settings:
    #: URL of the Celery broker: Redis (redis://:pw@host:6379/0), which then holds the job state
    #: too, or RabbitMQ (amqp://user:pw@host:5672/vhost) beside a Redis for the state (state_url).
    broker_url: str | None = None
    #: Redis URL of the job state, when the broker is not Redis; None: the broker's Redis.
    state_url: str | None = None
    #: Where outputs go: s3://bucket/prefix, or a local folder.
    store: str | None = None
    #: S3 endpoint for non-AWS servers; None lets boto3 decide (it reads AWS_ENDPOINT_URL).
    s3_endpoint_url: str | None = None
    #: Where built-in models are built and cached on a worker host.
    cache_dir: Path = field(default_factory=_default_cache_dir)
    #: Config folders for single-file checkpoints, one per family; None uses farm's own.
    model_configs: Path | None = None
    #: Load .ckpt/.pt checkpoints (Python pickles) at all. Off: refused by name, unread.
    #: On: read with torch's restricted unpickler (weights only), as the webui does.
    allow_pickle: bool = False
    #: "auto" picks CUDA when present, else CPU; or any torch device string.
    device: str = "auto"
    #: Seconds a delivered message may go without its lease renewed before the
    #: broker hands it to another worker. Short, so a dead worker's chunk comes
    #: back fast; a live worker renews it every third of this while it renders.
    visibility_timeout: float = 15.0
    #: Prefix of the render queues: each worker consumes `<queue>.<worker name>`.
    queue: str = "farm.render"
    #: Largest batch a worker renders in one forward pass; a chunk above it is split.
    #: None: the job's batch_size. A worker that runs out of memory halves it by itself.
    max_batch: int | None = None
    #: torch.compile every UNet a CUDA worker loads: minutes of warm-up for each new shape,
    #: then faster steps; worth it for long sweeps of one shape.
    compile_unet: bool = False
    #: torch CPU threads per worker process. None: torch's default (every core), right for
    #: one worker a host; several CPU workers on one host must split the cores, or their
    #: thread pools fight (two 2-thread workers on 2 cores ran 20x slower than one).
    cpu_threads: int | None = None
    #: Models a worker loads when it starts, before its first chunk (`farm run` names the job's).
    preload: tuple[str, ...] = ()
    #: The operator's model folder: the names an HTTP client may ask for (beside the built-ins)
    #: are the checkpoints and diffusers folders below it. None: built-ins only over HTTP.
    model_dir: Path | None = None
    #: Textual-inversion embeddings (`.safetensors`) that prompts use by file name (workers read it).
    embeddings_dir: Path | None = None
    #: LoRA files (`.safetensors`) that prompts name with `<lora:NAME:WEIGHT>`; the dispatcher
    #: checks them at submission and the workers load them, so both must see this folder.
    lora_dir: Path | None = None
    #: `farm serve`: the largest request body it reads; a larger one answers 413.
    api_max_body: int = 32 * 1024 * 1024
    #: `farm serve`: the most items one user may have waiting (queued or running) at once; a
    #: submission past it answers 429.
    api_max_queued: int = 100_000
    #: Signs every webhook's body (HMAC-SHA256); jobs with a webhook are refused without it.
    webhook_secret: str | None = None
    #: Fault injection for the test suite: the worker raises out-of-memory on any batch
    #: larger than this. Never set it in production.
    inject_oom_above: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        kwargs: dict = {
            "broker_url": env.get("FARM_BROKER_URL") or None,
            "state_url": env.get("FARM_STATE_URL") or None,
            "store": env.get("FARM_STORE") or None,
            "s3_endpoint_url": env.get("AWS_ENDPOINT_URL") or None,
            "device": env.get("FARM_DEVICE") or "auto",
            "queue": env.get("FARM_QUEUE") or "farm.render",
        }
        if env.get("FARM_ALLOW_PICKLE_CHECKPOINTS", "").lower() in ("1", "true", "yes"):
            kwargs["allow_pickle"] = True
        if env.get("FARM_COMPILE", "").lower() in ("1", "true", "yes"):
            kwargs["compile_unet"] = True
        if env.get("FARM_MODEL_CONFIGS"):
            kwargs["model_configs"] = Path(env["FARM_MODEL_CONFIGS"])
        if env.get("FARM_WEBHOOK_SECRET"):
            kwargs["webhook_secret"] = env["FARM_WEBHOOK_SECRET"]
        if env.get("FARM_MODEL_DIR"):
            kwargs["model_dir"] = Path(env["FARM_MODEL_DIR"])
        if env.get("FARM_EMBEDDINGS_DIR"):
            kwargs["embeddings_dir"] = Path(env["FARM_EMBEDDINGS_DIR"])
        if env.get("FARM_LORA_DIR"):
            kwargs["lora_dir"] = Path(env["FARM_LORA_DIR"])
        if env.get("FARM_CACHE_DIR"):
            kwargs["cache_dir"] = Path(env["FARM_CACHE_DIR"])
        for name, var in (("max_batch", "FARM_MAX_BATCH"), ("inject_oom_above", "FARM_INJECT_OOM_ABOVE"),
                          ("cpu_threads", "FARM_CPU_THREADS"), ("api_max_body", "FARM_API_MAX_BODY"),
                          ("api_max_queued", "FARM_API_MAX_QUEUED")):
            if env.get(var):
                kwargs[name] = int(env[var])
        if env.get("FARM_PRELOAD"):
            kwargs["preload"] = tuple(m for m in env["FARM_PRELOAD"].split(",") if m)
        if env.get("FARM_VISIBILITY_TIMEOUT"):
            kwargs["visibility_timeout"] = float(env["FARM_VISIBILITY_TIMEOUT"])
        return cls(**kwargs)

    def with_overrides(self, **changes) -> "Settings":
        """A copy with each given value that is not None replaced (CLI flags win)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """The FARM_ variables that reproduce these settings in a child process."""
        env = {
            "FARM_DEVICE": self.device,
            "FARM_CACHE_DIR": str(self.cache_dir),
            "FARM_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "FARM_QUEUE": self.queue,
        }
        if self.max_batch:
            env["FARM_MAX_BATCH"] = str(self.max_batch)
        if self.compile_unet:
            env["FARM_COMPILE"] = "1"
        if self.cpu_threads:
            env["FARM_CPU_THREADS"] = str(self.cpu_threads)
        if self.inject_oom_above:
            env["FARM_INJECT_OOM_ABOVE"] = str(self.inject_oom_above)
        if self.model_configs:
            env["FARM_MODEL_CONFIGS"] = str(self.model_configs)
        if self.allow_pickle:
            env["FARM_ALLOW_PICKLE_CHECKPOINTS"] = "1"
        if self.model_dir:
            env["FARM_MODEL_DIR"] = str(self.model_dir)
        if self.embeddings_dir:
            env["FARM_EMBEDDINGS_DIR"] = str(self.embeddings_dir)
        if self.lora_dir:
            env["FARM_LORA_DIR"] = str(self.lora_dir)
        if self.webhook_secret:
            env["FARM_WEBHOOK_SECRET"] = self.webhook_secret
        if self.api_max_body != Settings.api_max_body:
            env["FARM_API_MAX_BODY"] = str(self.api_max_body)
        if self.api_max_queued != Settings.api_max_queued:
            env["FARM_API_MAX_QUEUED"] = str(self.api_max_queued)
        if self.preload:
            env["FARM_PRELOAD"] = ",".join(self.preload)
        if self.broker_url:
            env["FARM_BROKER_URL"] = self.broker_url
        if self.state_url:
            env["FARM_STATE_URL"] = self.state_url
        if self.store:
            env["FARM_STORE"] = self.store
        if self.s3_endpoint_url:
            env["AWS_ENDPOINT_URL"] = self.s3_endpoint_url
        return env

    def require_broker(self) -> str:
        if not self.broker_url:
            raise SettingMissing("no broker: set FARM_BROKER_URL (redis://host:6379/0) or pass --broker")
        return self.broker_url

    @property
    def broker_is_redis(self) -> bool:
        return (self.broker_url or "").startswith(("redis://", "rediss://", "unix://"))

    def require_state(self) -> str:
        """The Redis that holds the job state: FARM_STATE_URL, or the broker when it is Redis."""
        if self.state_url:
            return self.state_url
        if self.broker_is_redis or not self.broker_url:
            return self.require_broker()
        raise SettingMissing("the broker is not Redis: set FARM_STATE_URL (redis://host:6379/0) for the job state")

    def require_store(self) -> str:
        if not self.store:
            raise SettingMissing("no store: set FARM_STORE (s3://bucket/prefix or a folder) or pass --store")
        return self.store

    @property
    def lease_renew_interval(self) -> float:
        return self.visibility_timeout / 3
