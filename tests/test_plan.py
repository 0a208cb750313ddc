import time
import tracemalloc

from farm.plan import Plan
from farm.spec import parse_spec


def spec(**changes):
    base = {"prompts": ["p0", "p1"], "seeds": {"start": 10, "count": 3}, "width": 64, "height": 64,
            "grid": {"cfg_scale": [4.0, 7.0]}, "batch_size": 4}
    return parse_spec({**base, **changes})


def test_items_follow_grid_then_prompt_then_seed_order():
    plan = Plan(spec(), "job-1")
    items = [plan.item(i) for i in range(plan.item_count)]
    assert [(i.cfg_scale, i.prompt, i.seed) for i in items[:4]] == [
        (4.0, "p0", 10), (4.0, "p0", 11), (4.0, "p0", 12), (4.0, "p1", 10)]
    assert items[6].cfg_scale == 7.0 and items[6].seed == 10
    assert [i.index for i in items] == list(range(12))


def test_chunks_cover_every_item_once_and_never_cross_a_grid_cell():
    plan = Plan(spec(), "job-1")
    chunks = list(plan.chunks())
    indexes = [item.index for c in chunks for item in c.items]
    assert indexes == list(range(plan.item_count))
    for chunk in chunks:
        assert len({item.cfg_scale for item in chunk.items}) == 1
        assert 1 <= chunk.batch_size <= 4
        for item in chunk.items:
            assert plan.chunk_of(item.index) == chunk.number
    # 6 items per cell at batch 4: 4 + 2, twice.
    assert [c.batch_size for c in chunks] == [4, 2, 4, 2]


def test_plan_is_a_pure_function_of_the_spec():
    a, b = Plan(spec(), "job-1"), Plan(spec(), "job-1")
    assert list(a.chunks()) == list(b.chunks())


def test_sampler_axis_resolves_combined_names_per_item():
    plan = Plan(spec(grid={"sampler": ["Euler a", "DPM++ 2M Karras", "DPM++ 2M"]}), "j")
    cells = [plan.item(i * 6) for i in range(3)]
    assert [(c.sampler, c.schedule_type) for c in cells] == [
        ("Euler a", "Automatic"), ("DPM++ 2M", "Karras"), ("DPM++ 2M", "Karras")]


def test_a_million_item_job_is_expanded_lazily():
    big = spec(seeds={"start": 0, "count": 250_000}, prompts=["a", "b"], grid={"steps": [10, 20]})
    tracemalloc.start()
    started = time.perf_counter()
    plan = Plan(big, "huge")
    last = plan.item(plan.item_count - 1)
    chunk = plan.chunk(plan.chunk_count - 1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan.item_count == 1_000_000
    assert (last.steps, last.prompt, last.seed) == (20, "b", 249_999)
    assert chunk.items[-1].index == 999_999
    assert peak < 1_000_000  # bytes: nothing proportional to the item count was built
    assert time.perf_counter() - started < 5


def test_model_groups_partition_the_chunks_by_model_in_plan_order():
    for grid in ({"cfg_scale": [4.0, 7.0], "model": ["a", "b", "c"], "steps": [3, 4]}, {"model": ["a", "b"]},
                 {"model": ["a", "b"], "cfg_scale": [1.0, 2.0, 3.0]}, {"steps": [2, 3]}):
        plan = Plan(spec(grid=grid, batch_size=2), "j")
        seen = []
        for group, model in enumerate(plan.models):
            numbers = [plan.group_chunk(group, k) for k in range(plan.group_chunk_count(group))]
            assert numbers == sorted(numbers)
            assert {item.model for n in numbers for item in plan.chunk(n).items} == {model}
            seen += numbers
        assert sorted(seen) == list(range(plan.chunk_count))
        assert all(list(plan.chunk_range(n)) == [i.index for i in plan.chunk(n).items] for n in seen)


def test_a_render_message_survives_json_with_its_hires_pass_and_charge():
    import json

    import pytest

    from farm.fairshare import Charge
    from farm.message import BadMessage, RenderMessage

    plan = Plan(spec(hires={"scale": 1.5, "upscaler": "Lanczos", "steps": 3}), "job-1")
    message = RenderMessage(plan.chunk(1), "s3://b/p", Charge("batch", "ann", 2.5))
    back = RenderMessage.from_kwargs(json.loads(json.dumps(message.to_kwargs())))
    assert back == message
    assert back.chunk.items[0].hires.upscaler == "Lanczos" and back.chunk.items[0].hires.latent is False
    assert RenderMessage.from_kwargs(RenderMessage(plan.chunk(0), "s").to_kwargs()).charge is None
    with pytest.raises(BadMessage, match="not a render message"):
        RenderMessage.from_kwargs({"job": "../etc", "chunk": 0, "items": [], "store": "s"})


def test_prompt_search_and_replace_swaps_the_first_value_for_each_in_prompt_and_negative():
    plan = Plan(spec(prompts=["a red circle", "red on red"], negative_prompt="red blur", seeds=[1],
                     grid={"prompt_sr": ["red", "blue", "<none>"], "cfg_scale": [5.0]}), "job-1")
    items = [plan.item(i) for i in range(plan.item_count)]
    assert [(i.prompt, i.negative_prompt) for i in items] == [
        ("a red circle", "red blur"), ("red on red", "red blur"),
        ("a blue circle", "blue blur"), ("blue on blue", "blue blur"),
        ("a <none> circle", "<none> blur"), ("<none> on <none>", "<none> blur")]
    # Each value is its own grid cell, so no batch mixes two replacements.
    assert {plan.chunk_of(i.index) for i in items[:2]} != {plan.chunk_of(i.index) for i in items[2:4]}
