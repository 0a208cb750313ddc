"""Settings survive the trip to a child process's environment and back, every field of them."""

from dataclasses import fields
from pathlib import Path

import pytest

from farm.errors import SettingMissing
from farm.settings import Settings

#: A value for every field that differs from its default, so a field that to_env() forgets fails.
CHANGED = {
    "broker_url": "redis://:p%40ss@10.0.0.5:6380/2",
    "state_url": "redis://:p%40ss@10.0.0.6:6379/0",
    "store": "s3://renders/team-a",
    "s3_endpoint_url": "http://minio:9000",
    "cache_dir": Path("/var/cache/farm-test"),
    "model_configs": Path("/etc/farm/configs"),
    "allow_pickle": True,
    "device": "cuda:1",
    "visibility_timeout": 42.5,
    "queue": "farm.render.night",
    "max_batch": 3,
    "compile_unet": True,
    "cpu_threads": 2,
    "inject_oom_above": 5,
    "preload": ("shapes-sd", "/models/mine"),
    "model_dir": Path("/srv/models"),
    "embeddings_dir": Path("/srv/embeddings"),
    "lora_dir": Path("/srv/loras"),
    "api_max_body": 1024,
    "api_max_queued": 7,
    "webhook_secret": "s3cr3t",
}


def test_every_field_round_trips_through_the_environment():
    assert set(CHANGED) == {f.name for f in fields(Settings)}, "a new setting needs a value here"
    settings = Settings(**CHANGED)
    for name, value in CHANGED.items():
        assert getattr(Settings(), name) != value, f"{name}: pick a value that is not the default"
    assert Settings.from_env(settings.to_env()) == settings


def test_defaults_round_trip_and_overrides_keep_unset_values():
    assert Settings.from_env(Settings().to_env()) == Settings()
    changed = Settings(queue="q").with_overrides(store="/tmp/out", broker_url=None)
    assert (changed.queue, changed.store, changed.broker_url) == ("q", "/tmp/out", None)


def test_a_missing_broker_or_store_is_named():
    with pytest.raises(SettingMissing, match="FARM_BROKER_URL"):
        Settings().require_broker()
    with pytest.raises(SettingMissing, match="FARM_STORE"):
        Settings().require_store()
    assert Settings(broker_url="redis://x", store="/o").require_broker() == "redis://x"


def test_the_job_state_lives_in_the_brokers_redis_or_in_farm_state_url():
    redis_broker = Settings.from_env({"FARM_BROKER_URL": "redis://r:6379/0"})
    assert redis_broker.broker_is_redis and redis_broker.require_state() == "redis://r:6379/0"
    rabbit = Settings.from_env({"FARM_BROKER_URL": "amqp://guest:guest@mq:5672/farm"})
    with pytest.raises(SettingMissing, match="FARM_STATE_URL"):
        rabbit.require_state()
    both = Settings.from_env({"FARM_BROKER_URL": "amqp://mq//", "FARM_STATE_URL": "redis://r:6379/1"})
    assert not both.broker_is_redis and both.require_state() == "redis://r:6379/1"
