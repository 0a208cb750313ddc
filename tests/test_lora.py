"""LoRA as the webui applies it: `<lora:NAME:WEIGHT>` read from the prompt and taken out of its
text, the file's layers merged into the weights with their weights (checked by hand), in kohya's
and diffusers' key layouts, refused at submission when it cannot be loaded. The test LoRAs are
made here, seeded, for tiny-sd."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from farm import loras
from farm.errors import ModelError, SpecError
from farm.plan import Item, Plan
from farm.prompts import LoraRef, extra_networks
from farm.spec import parse_spec
from workers import prompts, render
from workers.lora import Applied, LoraLibrary
from workers.models import ModelCache

UNET_LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
               "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
               "up_blocks.1.attentions.0.proj_in"]
TE_LAYERS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def model(cache_dir):
    return ModelCache(cache_dir, torch.device("cpu"), torch.float32, capacity=2).get("tiny-sd")


def _pairs(module: torch.nn.Module, generator) -> tuple[torch.Tensor, torch.Tensor]:
    weight = module.weight
    down = torch.randn((RANK, *weight.shape[1:]), generator=generator) * 0.5
    up = torch.randn((weight.shape[0], RANK, *([1] * (weight.ndim - 2))), generator=generator) * 0.5
    return down, up


@pytest.fixture(scope="module")
def lora_dir(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    unet, te = model.pipe.unet, model.pipe.text_encoder
    generator = torch.Generator().manual_seed(5)
    kohya, ours = {}, {}
    for name in UNET_LAYERS:
        down, up = _pairs(unet.get_submodule(name), generator)
        key = "lora_unet_" + name.replace(".", "_")
        kohya.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)})
        down, up = _pairs(unet.get_submodule(name), generator)
        ours.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up})
    for name in TE_LAYERS:
        down, up = _pairs(te.get_submodule(name), generator)
        key = "lora_te_text_model_" + name.replace(".", "_")
        kohya.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)})
        down, up = _pairs(te.get_submodule(name), generator)
        ours.update({f"text_encoder.text_model.{name}.lora_A.weight": down,
                     f"text_encoder.text_model.{name}.lora_B.weight": up})
    save_file(kohya, str(folder / "kohya-red.safetensors"))
    save_file(ours, str(folder / "diffusers-blue.safetensors"))
    (folder / "old.pt").write_bytes(b"a pickle farm never opens")
    return folder


def _item(index: int, prompt: str, **changes) -> Item:
    fields = dict(index=index, prompt=prompt, negative_prompt="", seed=100 + index, model="tiny-sd", mode="txt2img",
                  sampler="Euler a", schedule_type="Automatic", steps=3, cfg_scale=7.0, width=64, height=64)
    return Item(**{**fields, **changes})


def _draw(model, library, *prompts_):
    return [render.render(model, [_item(0, p)], None, loras=library)[0] for p in prompts_]


def test_the_prompts_lora_tags_are_read_as_the_webui_reads_them_and_taken_out():
    assert extra_networks("a <lora:x:0.8> cat <lora:y:0.5:1> <lora:z:te=0.3:unet=0.9> <lora:w>") == (
        "a  cat   ", [LoraRef("x", 0.8, 0.8), LoraRef("y", 0.5, 1.0), LoraRef("z", 0.3, 0.9), LoraRef("w", 1.0, 1.0)])
    assert extra_networks("no tags") == ("no tags", [])


def test_a_lora_the_farm_cannot_load_is_refused_at_submission_with_its_name_and_why(lora_dir):
    spec = parse_spec({"prompts": ["a <lora:kohya-red:0.5> cat", "a <lora:missing:1> dog", "<lora:old:1>"],
                       "grid": {"prompt_sr": ["cat", "<lora:diffusers-blue:1> cat", "<lora:gone:1> cat"]},
                       "negative_prompt": "cat"})
    assert loras.check(spec, lora_dir) == [
        ("prompts.1", f"<lora:missing>: no missing.safetensors in the LoRA folder {lora_dir}"),
        ("prompts.2", "<lora:old>: old.pt is a pickle-format LoRA, which farm never loads; convert it to .safetensors"),
        ("grid.prompt_sr[2]", f"<lora:gone>: no gone.safetensors in the LoRA folder {lora_dir}")]
    assert loras.check(parse_spec({"prompts": ["<lora:x:1>"]}), None) == [
        ("prompts.0", "<lora:x>: this farm has no LoRA folder (FARM_LORA_DIR), and the job's [loras] does not name it")]
    assert loras.check(parse_spec({"prompts": ["<lora:../x:1>"]}), lora_dir)[0][1].endswith(
        "a LoRA is named by its file name in the LoRA folder")


def test_the_lora_is_merged_into_each_layer_with_its_weight_and_taken_out_again(model, lora_dir):
    from safetensors.torch import load_file

    library = LoraLibrary(lora_dir)
    pipe = model.pipe
    data = load_file(str(lora_dir / "kohya-red.safetensors"))
    unet_layer, te_layer = pipe.unet.get_submodule(UNET_LAYERS[0]), pipe.text_encoder.get_submodule(TE_LAYERS[0])
    before = {m: m.weight.detach().clone() for m in (unet_layer, te_layer)}
    applied = Applied()
    applied.use(pipe, [LoraRef("kohya-red", te=0.5, unet=0.8)], library)
    try:
        for module, key, multiplier in ((unet_layer, "lora_unet_" + UNET_LAYERS[0].replace(".", "_"), 0.8),
                                        (te_layer, "lora_te_text_model_" + TE_LAYERS[0].replace(".", "_"), 0.5)):
            down, up = data[f"{key}.lora_down.weight"], data[f"{key}.lora_up.weight"]
            by_hand = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape) * (ALPHA / RANK)
            assert torch.equal(module.weight, before[module] + by_hand * multiplier)
    finally:
        applied.restore()
    assert all(torch.equal(m.weight, w) for m, w in before.items())


def test_weight_zero_draws_exactly_the_model_and_weights_move_it(model, lora_dir):
    library = LoraLibrary(lora_dir)
    plain, zero, full, plain_again = _draw(model, library, "a red circle", "a red circle <lora:kohya-red:0>",
                                           "a red circle <lora:kohya-red:1>", "a red circle")
    assert zero.tobytes() == plain.tobytes() == plain_again.tobytes()
    assert full.tobytes() != plain.tobytes()
    assert full.info[render.EXTRA_PARAMS]["Lora hashes"] == \
        "kohya-red: " + hashlib.sha256((lora_dir / "kohya-red.safetensors").read_bytes()).hexdigest()[:12]


def test_the_diffusers_layout_applies_and_te_and_unet_weights_apply_apart(model, lora_dir):
    library = LoraLibrary(lora_dir)
    pipe = model.pipe
    with torch.inference_mode():
        plain = prompts.Conditioner(pipe)(["a red circle"])
    for refs, text_changes in (([LoraRef("diffusers-blue", te=1.0, unet=0.0)], True),
                               ([LoraRef("diffusers-blue", te=0.0, unet=1.0)], False)):
        model.loras.use(pipe, refs, library)
        with torch.inference_mode():
            changed = not torch.equal(prompts.Conditioner(pipe)(["a red circle"]), plain)
        assert changed == text_changes
    model.loras.use(pipe, [], library)
    unet_only, plain_image = _draw(model, library, "a red circle <lora:diffusers-blue:0:1>", "a red circle")
    assert unet_only.tobytes() != plain_image.tobytes()


def test_a_batch_of_different_lora_sets_draws_each_image_as_a_batch_of_one_does(model, lora_dir):
    library = LoraLibrary(lora_dir)
    texts = ["a red circle", "a red circle <lora:kohya-red:1>", "a red circle <lora:diffusers-blue:0.7>",
             "a red circle <lora:kohya-red:0.5> <lora:diffusers-blue:0.5>"]
    items = [_item(i, text) for i, text in enumerate(texts)]
    together = render.render(model, items, None, loras=library)
    alone = [render.render(model, [item], None, loras=library)[0] for item in items]
    for a, b in zip(together, alone):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 2
    assert len({image.tobytes() for image in together}) == 4
    model.loras.use(model.pipe, [], library)


def test_a_job_brings_its_own_loras_checked_where_it_is_parsed(tmp_path):
    (tmp_path / "mine.safetensors").write_bytes(b"read by the worker, not here")
    spec = parse_spec({"prompts": ["a <lora:mine:0.5> cat", "a dog"], "loras": {"mine": "mine.safetensors"}},
                      base_dir=tmp_path)
    assert spec.loras == {"mine": str(tmp_path / "mine.safetensors")}
    assert loras.check(spec, None) == []
    for table, field, reason in (
            ({"mine": "gone.safetensors"}, "loras.mine", f"no such file: {tmp_path / 'gone.safetensors'}"),
            ({"mine": "old.pt"}, "loras.mine", "old.pt is a pickle-format LoRA, which farm never loads"),
            ({"mine": "notes.txt"}, "loras.mine", "must be a .safetensors file"),
            ({"../up": "mine.safetensors"}, "loras", "a LoRA's name is 1-128 letters")):
        with pytest.raises(SpecError) as refused:
            parse_spec({"prompts": ["a <lora:mine:0.5> cat"], "loras": table}, base_dir=tmp_path)
        (got_field, got_reason), = refused.value.problems
        assert got_field.startswith(field) and reason in got_reason, refused.value.problems


def test_only_the_items_that_name_a_job_lora_carry_its_store_key_and_messages_keep_it():
    spec = parse_spec({"prompts": ["a <lora:mine:0.5> cat", "a dog"], "seeds": [1],
                       "loras": {"mine": "store:team/mine.safetensors", "other": "store:team/other.safetensors"}})
    plan = Plan(spec, "job-1")
    named, plain = plan.item(0), plan.item(1)
    assert named.loras == (("mine", "store:team/mine.safetensors"),) and plain.loras == ()
    assert Item.from_dict(json.loads(json.dumps(named.to_dict()))) == named
    assert "loras" not in plain.to_dict()  # the records of jobs without keep their digests


def test_a_job_lora_fetched_from_the_store_draws_as_the_same_file_in_the_folder(model, lora_dir):
    data = (lora_dir / "kohya-red.safetensors").read_bytes()
    library = LoraLibrary(lora_dir)
    library.fetch([_item(0, "x", loras=(("mine", "store:job/inputs/abc.safetensors"),))],
                  {"job/inputs/abc.safetensors": data}.__getitem__)
    from_store = render.render(model, [_item(0, "a red circle <lora:mine:0.8>",
                                             loras=(("mine", "store:job/inputs/abc.safetensors"),))], None,
                               loras=library)[0]
    from_folder = render.render(model, [_item(0, "a red circle <lora:kohya-red:0.8>")], None, loras=library)[0]
    assert from_store.tobytes() == from_folder.tobytes()
    digest = hashlib.sha256(data).hexdigest()[:12]
    assert from_store.info[render.EXTRA_PARAMS]["Lora hashes"] == f"mine: {digest}"
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        library.fetch([_item(0, "x", loras=(("bad", "store:job/inputs/bad.safetensors"),))],
                      {"job/inputs/bad.safetensors": b"\x00garbage"}.__getitem__)
    model.loras.use(model.pipe, [], library)
