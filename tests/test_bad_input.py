"""Over a hundred malformed or hostile specs, generated as mutations of a valid one, each sent
through `farm submit` against real Redis and S3: refused with exit code 2 and a message that
names the field, with nothing written to Redis or the bucket. Plus the path-escape rules."""

from __future__ import annotations

import json

import pytest

from farm.errors import SpecError
from farm.spec import MAX_SPEC_BYTES, parse_spec

VALID = {"prompts": ["a red circle"], "seeds": [1], "width": 64, "height": 64, "steps": 4}

WRONG_TYPES = ["20", 2.5, True, [1], {"a": 1}]


def _mutations() -> list[tuple[str, dict]]:
    cases: list[tuple[str, dict]] = []
    ints = {"steps": (1, 150), "batch_size": (1, 64), "clip_skip": (1, 12), "priority": (-100, 100)}
    for name, (lo, hi) in ints.items():
        cases += [(name, {name: v}) for v in WRONG_TYPES + [lo - 1, hi + 1, 10**12]]
    for name in ("width", "height"):
        cases += [(name, {name: v}) for v in (65, 100, 0, -64, 8192, "512", 512.0, 2**40)]
    for name in ("cfg_scale", "variation_strength"):
        cases += [(name, {name: v}) for v in ("7", [], -1.0, 1e9, float("nan"), float("inf"))]
    for name in ("sampler", "schedule_type", "mode", "lane", "masked_content", "inpaint_area"):
        cases += [(name, {name: v}) for v in (5, [], {}, "bogus")]
    cases += [("model", {"model": v}) for v in (5, [], "", "weights.ckpt", "/no/such/model")]
    cases += [("negative_prompt", {"negative_prompt": v}) for v in (5, ["x"], "x" * 20_000, "a\x00b")]
    cases += [("prompts", {"prompts": v}) for v in ([], "a red circle", [5], [[]], ["a\x00b"], ["x" * 20_000], None)]
    cases += [("seeds", {"seeds": v}) for v in ("x", [1.5], [-2], [2**40], {"start": 1}, {"start": 1, "count": 0},
                                                {"start": 0, "count": 10**9}, [], {"start": 1, "count": 2, "x": 1})]
    cases += [("grid", {"grid": v}) for v in ({"bogus": [1]}, {"steps": []}, {"steps": "x"}, {"steps": [0]},
                                              {"width": [65]}, {"sampler": ["nope"]}, {"model": ["x.ckpt"]},
                                              {"prompts": ["a"]}, [1], {"cfg_scale": [1.0, "x"]})]
    cases += [(key, {key: 1}) for key in ("stepz", "prompt", "Steps", "__class__", "../etc")]
    cases += [("name", {"name": v}) for v in ("../escape", "/abs", "a/b", "x" * 500, "", "a b", "..")]
    cases += [("hires", {"hires": v}) for v in ("yes", {"scale": 10}, {"upscaler": "nope"}, {"steps": -1},
                                                {"denoising_strength": 2})]
    cases += [("resize_seed_from", {"resize_seed_from": v}) for v in ([64], [65, 64], "64x64")]
    cases += [("variation_seed", {"variation_seed": v}) for v in ("x", -5, 2**40)]
    return cases


MUTATIONS = _mutations()


def test_there_are_over_a_hundred_distinct_mutations():
    assert len(MUTATIONS) >= 100
    assert len({json.dumps(m, sort_keys=True, default=str) for _, m in MUTATIONS}) == len(MUTATIONS)


def _problem_fields(output: str) -> list[str]:
    lines = output.split("invalid job spec:", 1)[-1].splitlines()
    return [line.strip().split(":", 1)[0] for line in lines if line.startswith("  ")]


@pytest.fixture
def submit_cli(farm_settings, s3_env, monkeypatch, tmp_path, redis_client, s3_server, bucket):
    from typer.testing import CliRunner

    from farm.cli import app

    for name, value in {**s3_env, **farm_settings.to_env()}.items():
        monkeypatch.setenv(name, value)

    def run(spec_text: str, suffix: str = ".json"):
        path = tmp_path / f"bad{suffix}"
        path.write_text(spec_text)
        result = CliRunner().invoke(app, ["submit", str(path)])
        # Nothing was written anywhere: no job state, no message, no object.
        assert redis_client.keys("*") == []
        assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
        return result

    return run


@pytest.mark.parametrize("field, change", MUTATIONS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(MUTATIONS)])
def test_a_mutated_spec_is_refused_naming_the_field(submit_cli, field, change):
    data = {**VALID, **change}
    if change.get(field, 0) is None:
        del data[field]
    result = submit_cli(json.dumps(data))
    assert result.exit_code == 2, result.output
    fields = _problem_fields(result.output)
    assert any(f == field or f.startswith((field + ".", field + "[")) for f in fields), (field, result.output)


def test_a_toml_bomb_is_refused_as_spec_not_crash(submit_cli):
    deep = "a = " + "[" * 100_000 + "]" * 100_000 + "\n"
    result = submit_cli(deep, ".toml")
    assert result.exit_code == 2 and _problem_fields(result.output) == ["spec"]


def test_an_oversized_spec_file_is_refused_before_it_is_parsed(submit_cli):
    big = json.dumps({**VALID, "prompts": ["x" * 10_485_760]})
    assert len(big) > MAX_SPEC_BYTES
    result = submit_cli(big)
    assert result.exit_code == 2 and _problem_fields(result.output) == ["spec"]
    assert "at most" in result.output


def test_a_10mb_prompt_is_refused_naming_the_prompt():
    with pytest.raises(SpecError) as e:
        parse_spec({**VALID, "prompts": ["ok", "x" * 10_485_760]})
    assert [f for f, _ in e.value.problems] == ["prompts.1"]


@pytest.mark.parametrize("change, field", [
    ({"mode": "img2img", "init_image": "missing.png"}, "init_image"),
    ({"mode": "img2img", "init_image": "not-an-image.png"}, "init_image"),
    ({"mode": "img2img", "init_image": "../../../../etc/passwd"}, "init_image"),
    ({"mode": "inpaint", "init_image": "init.png", "mask": "small-mask.png"}, "mask"),
    ({"mode": "inpaint", "init_image": "init.png", "mask": "not-an-image.png"}, "mask"),
])
def test_bad_images_are_refused_naming_the_field(submit_cli, tmp_path, change, field):
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(tmp_path / "init.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small-mask.png")
    (tmp_path / "not-an-image.png").write_bytes(b"GIF89a but not really" * 10)
    result = submit_cli(json.dumps({**VALID, **change}))
    assert result.exit_code == 2
    assert field in _problem_fields(result.output), result.output


# --- path escape -------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "a\\b", "./a", "a/.."])
def test_store_keys_cannot_leave_the_prefix(tmp_path, key):
    from farm.store import LocalStore, S3Store

    local = LocalStore(tmp_path / "store")
    with pytest.raises(ValueError):
        local.put(key, b"x")
    with pytest.raises(ValueError):
        S3Store("bucket", "prefix", endpoint_url="http://127.0.0.1:9").put(key, b"x")
    assert not any(tmp_path.parent.rglob("passwd"))


@pytest.mark.parametrize("job_id", ["../x", "a/b", "/abs", "..", "x" * 200, "a b"])
def test_job_ids_never_become_path_components(job_id):
    from farm import keys

    with pytest.raises(ValueError):
        keys.image(job_id, 0, 1)


@pytest.mark.parametrize("user", ["../../etc", "a/b", "", "x" * 100, "ann smith", "ann\n"])
def test_user_names_are_checked(user):
    from dispatcher.submit import check_user

    with pytest.raises(SpecError) as e:
        check_user(user)
    assert e.value.problems[0][0] == "user"


def test_prompt_text_never_reaches_a_key():
    from farm import keys
    from farm.plan import Plan

    plan = Plan(parse_spec({**VALID, "prompts": ["../../../etc/passwd", "/abs/path"]}), "job-1")
    assert [keys.image("job-1", i.index, i.seed) for i in (plan.item(0), plan.item(1))] == [
        "job-1/images/000000-1.png", "job-1/images/000001-1.png"]
