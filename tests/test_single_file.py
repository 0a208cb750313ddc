"""Single-file checkpoints: families detected from the header, SD1 and SD1-inpainting loaded offline
through the same code as a user's file (with tiny config folders in place of the real ones)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from farm import checkpoints
from farm.errors import ModelError, SpecError
from farm.plan import HiresPass, Item
from farm.spec import parse_spec
from tests.ldm import build_tiny_xl_pipeline, save_sd1_checkpoint, save_sdxl_checkpoint
from workers import render
from workers.models import ModelCache, model_hash
from workers.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Tiny SD1 and SD1-inpainting pipelines, each as a diffusers folder (also its family's config
    folder) and as an LDM-layout .safetensors file holding the same weights."""
    root = tmp_path_factory.mktemp("single-file")
    made = {}
    for family, inpainting in (("sd1", False), ("sd1-inpainting", True), ("sd2", False), ("sd2-inpainting", True)):
        torch.manual_seed(3)
        sd2 = family.startswith("sd2")
        pipe = build_tiny_pipeline(inpainting=inpainting, layers_per_block=2, text_width=1024 if sd2 else 32)
        pipe.save_pretrained(root / "configs" / family)
        made[family] = save_sd1_checkpoint(pipe, root / f"my-{family}.safetensors", layers=2, openclip=sd2)
        assert checkpoints.detect(made[family]).name == family
    for family, inpainting in (("sdxl", False), ("sdxl-inpainting", True)):
        torch.manual_seed(3)
        pipe = build_tiny_xl_pipeline(inpainting=inpainting)
        pipe.save_pretrained(root / "configs" / family)
        made[family] = save_sdxl_checkpoint(pipe, root / f"my-{family}.safetensors", layers=2)
        assert checkpoints.detect(made[family]).name == family
    return root, made


def fake_checkpoint(path, shapes: dict) -> str:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return str(path)


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("shapes, family", [
    ({UNET_IN: (32, 4, 3, 3)}, "sd1"),
    ({UNET_IN: (32, 9, 3, 3)}, "sd1-inpainting"),
    ({UNET_IN: (32, 4, 3, 3), "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}, "sd2"),
    ({UNET_IN: (32, 9, 3, 3), "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)},
     "sd2-inpainting"),
    ({UNET_IN: (32, 4, 3, 3), "conditioner.embedders.1.model.ln_final.weight": (1280,)}, "sdxl"),
])
def test_family_is_detected_from_the_header_alone(tmp_path, shapes, family):
    path = fake_checkpoint(tmp_path / "m.safetensors", shapes)
    assert checkpoints.detect(__import__("pathlib").Path(path)).name == family


def test_files_that_are_no_checkpoint_are_refused_at_submission(tmp_path):
    fake_checkpoint(tmp_path / "lora.safetensors", {"lora_unet_down.weight": (4, 4)})
    with pytest.raises(SpecError, match="holds no Stable Diffusion UNet"):
        parse_spec({"prompts": ["x"], "model": str(tmp_path / "lora.safetensors")})
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(SpecError, match="not a readable safetensors file"):
        parse_spec({"prompts": ["x"], "model": str(tmp_path / "junk.safetensors")})


def test_inpainting_checkpoint_is_only_for_inpaint(tiny_checkpoints):
    _, made = tiny_checkpoints
    with pytest.raises(SpecError, match="is an inpainting model"):
        parse_spec({"prompts": ["x"], "model": str(made["sd1-inpainting"])})


@pytest.mark.parametrize("family", ["sd1", "sd1-inpainting", "sd2", "sd2-inpainting", "sdxl", "sdxl-inpainting"])
def test_single_file_loads_the_same_weights_as_a_folder_and_renders_alike(tiny_checkpoints, tmp_path, family):
    root, made = tiny_checkpoints
    cache = ModelCache(tmp_path, torch.device("cpu"), torch.float32, config_override=root / "configs")
    from_file = cache.get(str(made[family]))
    from_folder = cache.get(str(root / "configs" / family))
    # SD2's prediction type comes from the webui's test of the UNet; give the folder the same answer.
    from_folder.scheduler_config = from_file.scheduler_config
    assert from_file.name == f"my-{family}" and from_file.hash == model_hash(made[family])
    assert from_file.inpainting == family.endswith("inpainting")
    mode = "inpaint" if from_file.inpainting else "txt2img"
    extra = dict(init_image="store:i", mask="store:m", denoising_strength=0.7, mask_blur=2, masked_content="original",
                 inpaint_area="whole") if mode == "inpaint" else {}
    item = Item(0, "a red circle", "", 5, "m", mode, "Euler", "Automatic", 4, 7.0, 64, 64, **extra)
    from PIL import Image
    fetch = {"store:i": Image.new("RGB", (64, 64), "red"), "store:m": Image.new("L", (64, 64), 255)}.__getitem__
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(from_folder.pipe, name):
            ours, theirs = getattr(from_file.pipe, name).state_dict(), getattr(from_folder.pipe, name).state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    import numpy as np

    a = np.asarray(render.render(from_file, [item], fetch)[0], dtype=np.int16)
    b = np.asarray(render.render(from_folder, [item], fetch)[0], dtype=np.int16)
    # Same weights; converted tensors may differ in memory layout, which can change rounding.
    assert np.abs(a - b).max() <= 2 and a.std() > 0


def test_packaged_sd1_config_carries_the_real_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    from workers.single_file import config_folder

    folder = config_folder(checkpoints.Family("sd1", False), tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) == 49408
    # the ids openai/clip-vit-large-patch14 gives this sentence
    assert tokenizer("a photograph of an astronaut riding a horse").input_ids == [
        49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"] == 768


def test_missing_family_in_operator_configs_is_a_clear_error(tiny_checkpoints, tmp_path):
    _, made = tiny_checkpoints
    (tmp_path / "empty").mkdir()
    cache = ModelCache(tmp_path, torch.device("cpu"), torch.float32, config_override=tmp_path / "empty")
    with pytest.raises(ModelError, match="no config folder for sd1 in FARM_MODEL_CONFIGS"):
        cache.get(str(made["sd1"]))


def test_sd2_prediction_type_follows_the_webui_unet_test():
    from types import SimpleNamespace

    from workers.single_file import predicts_velocity

    class FakeUnet:
        dtype, device = torch.float32, torch.device("cpu")
        config = SimpleNamespace(cross_attention_dim=1024, in_channels=4)

        def __init__(self, shift):
            self.shift = shift

        def __call__(self, x, t, encoder_hidden_states):
            assert t.item() == 999 and encoder_hidden_states.shape == (1, 77, 1024)
            return SimpleNamespace(sample=x + self.shift)

    assert predicts_velocity(FakeUnet(-2.0)) is True
    assert predicts_velocity(FakeUnet(0.3)) is False


def test_sd2_config_pads_with_openclips_token(tmp_path):
    from transformers import CLIPTokenizer

    from workers.single_file import config_folder

    tokenizer = CLIPTokenizer.from_pretrained(config_folder(checkpoints.Family("sd2", False), tmp_path) / "tokenizer")
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0


def test_sdxl_checkpoint_runs_img2img_and_hires_and_ignores_clip_skip(tiny_checkpoints, tmp_path):
    from PIL import Image

    root, made = tiny_checkpoints
    cache = ModelCache(tmp_path, torch.device("cpu"), torch.float32, config_override=root / "configs")
    model = cache.get(str(made["sdxl"]))
    assert model.xl and model.pipeline("img2img").__class__.__name__ == "StableDiffusionXLImg2ImgPipeline"
    fetch = {"store:i": Image.new("RGB", (64, 64), "red")}.__getitem__
    base = dict(prompt="a red circle", negative_prompt="", seed=5, model="m", sampler="Euler", schedule_type="Automatic",
                steps=4, cfg_scale=7.0, width=64, height=64)
    img2img = render.render(model, [Item(0, mode="img2img", init_image="store:i", denoising_strength=0.5, **base)], fetch)
    hires = render.render(model, [Item(0, mode="txt2img", hires=HiresPass("Latent", 1.5, 2, 0.5), **base)], fetch)
    plain = render.render(model, [Item(0, mode="txt2img", **base)], fetch)[0]
    skipped = render.render(model, [Item(0, mode="txt2img", clip_skip=2, **base)], fetch)[0]
    assert img2img[0].size == (64, 64) and hires[0].size == (96, 96)
    # SDXL's conditioner takes the penultimate layer whatever Clip skip says, as the webui does
    # with its default "Clip skip SDXL" off.
    assert plain.tobytes() == skipped.tobytes()


def test_pickle_checkpoint_loads_only_with_the_operators_opt_in(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    root, made = tiny_checkpoints
    ckpt = tmp_path / "old-style.ckpt"
    torch.save({"state_dict": load_file(str(made["sd1"]))}, ckpt)
    with pytest.raises(SpecError, match="is a pickle checkpoint"):
        parse_spec({"prompts": ["x"], "model": str(ckpt)})
    assert parse_spec({"prompts": ["x"], "model": str(ckpt)}, allow_pickle=True).model == str(ckpt)
    refusing = ModelCache(tmp_path, torch.device("cpu"), torch.float32, config_override=root / "configs")
    with pytest.raises(ModelError, match="FARM_ALLOW_PICKLE_CHECKPOINTS"):
        refusing.get(str(ckpt))
    allowing = ModelCache(tmp_path, torch.device("cpu"), torch.float32, config_override=root / "configs",
                          allow_pickle=True)
    model = allowing.get(str(ckpt))
    assert model.name == "old-style" and not model.inpainting
    item = Item(0, "a red circle", "", 5, "m", "txt2img", "Euler", "Automatic", 3, 7.0, 64, 64)
    assert render.render(model, [item], None)[0].size == (64, 64)


def test_even_with_the_opt_in_a_pickle_that_runs_code_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Boom()}))
    cache = ModelCache(tmp_path, torch.device("cpu"), torch.float32, allow_pickle=True)
    with pytest.raises(ModelError, match="refused by the restricted unpickler"):
        cache.get(str(path))
    assert not marker.exists()


def test_sdxl_conditioning_is_both_encoders_penultimate_layers_emphasised_each_and_the_second_pooled(
        tiny_checkpoints, tmp_path):
    from workers import prompts

    root, made = tiny_checkpoints
    model = ModelCache(tmp_path, torch.device("cpu"), torch.float32, config_override=root / "configs").get(
        str(made["sdxl"]))
    pipe = model.pipe
    with torch.inference_mode():
        # A plain prompt is what diffusers encodes; an empty negative is zeros, as the webui zeroes it.
        ours = prompts.PromptSchedule(pipe, ["a red circle"], [""], 4, xl=True).at(0)
        theirs = pipe.encode_prompt("a red circle", device="cpu", negative_prompt=None)
        for name, tensor in zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                 "negative_pooled_prompt_embeds"), theirs):
            assert torch.equal(ours[name], tensor), name
        assert not ours["negative_prompt_embeds"].any()

        # Emphasis and a second chunk, by hand: each encoder weighs its own penultimate layer and
        # restores its own mean; the pooled output is the second encoder's, first chunk, unweighted.
        text = "a (red:1.4) circle BREAK blue"
        hand, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
            ids = [tokenizer(piece, add_special_tokens=False).input_ids for piece in ("a ", "red", " circle", "blue")]
            first = [bos, *ids[0], *ids[1], *ids[2]]
            rows = [first + [eos] * (77 - len(first)), [bos, *ids[3]] + [eos] * (76 - len(ids[3]))]
            weights = [[1.0] * (1 + len(ids[0])) + [1.4] * len(ids[1]) + [1.0] * (76 - len(ids[0]) - len(ids[1])),
                       [1.0] * 77]
            chunks = []
            for row, w in zip(rows, weights):
                tokens = torch.tensor([row])
                end = row.index(eos)
                tokens[0, end + 1:] = pad
                out = encoder(tokens, output_hidden_states=True)
                z = out.hidden_states[-2]
                if any(x != 1.0 for x in w):
                    weighted = z * torch.tensor([w]).unsqueeze(-1)
                    z = weighted * (z.mean() / weighted.mean())
                chunks.append(z)
                if pooled is None and hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
            hand.append(torch.hstack(chunks))
        conditioning, pooled_ours = prompts.ConditionerXL(pipe).encode([text])
        assert torch.equal(conditioning, torch.cat(hand, dim=-1)) and torch.equal(pooled_ours, pooled)


def test_sdxl_prompt_editing_switches_both_the_tokens_and_the_pooled_conditioning(tiny_checkpoints, tmp_path):
    root, made = tiny_checkpoints
    model = ModelCache(tmp_path, torch.device("cpu"), torch.float32, config_override=root / "configs").get(
        str(made["sdxl"]))
    seen = []
    hook = model.pipe.unet.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["added_cond_kwargs"]["text_embeds"][1:].clone()), with_kwargs=True)
    base = dict(negative_prompt="", seed=5, model="m", mode="txt2img", sampler="Euler", schedule_type="Automatic",
                steps=4, cfg_scale=7.0, width=64, height=64)
    try:
        edited = render.render(model, [Item(0, prompt="a [red:blue:1] circle", **base)], None)[0]
    finally:
        hook.remove()
    plain = [render.render(model, [Item(0, prompt=p, **base)], None)[0].tobytes() for p in ("a red circle",
                                                                                          "a blue circle")]
    assert edited.tobytes() not in plain
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2]) and torch.equal(seen[2], seen[3])
