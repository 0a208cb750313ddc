"""`shapes-ring`, the LoRA trained for shapes-sd (workers.shapes.ring): its weight moves the picture
the way it should (0 draws the model itself, byte for byte; 1 draws circles as rings; squares stay
squares), its file is what the trainer writes, and the webui's layout is what the farm reads."""

from __future__ import annotations

import pytest
import torch

from farm import loras
from farm.prompts import LoraRef
from workers import render
from workers.lora import LoraFile, LoraLibrary, _layer_modules
from workers.models import ModelCache
from workers.shapes import analysis, ring, world

MAX_LORA_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def shapes_model(cache_dir):
    return ModelCache(cache_dir, torch.device("cpu"), torch.float32, capacity=1).get("shapes-sd")


def test_the_shipped_lora_is_small_in_kohyas_layout_and_every_layer_fits_shapes_sd(shapes_model):
    path = loras.find(None, ring.NAME)
    assert path.parent == loras.BUILTIN_DIR and path.stat().st_size < MAX_LORA_BYTES
    lora = LoraFile.read(path)
    modules = _layer_modules(shapes_model.pipe)
    assert len(lora.layers) > 100
    for (part, layer), tensors in lora.layers.items():
        assert part == "unet" and set(tensors) == {"down", "up", "alpha"}
        assert modules[(part, layer)].weight[0].numel() == tensors["down"][0].numel()


@pytest.mark.slow
def test_the_loras_weight_turns_circles_into_rings_and_leaves_squares(shapes_model):
    library = LoraLibrary(None)
    circles = ring.ring_rates(shapes_model, library, "circle", weights=(0.0, 1.0), seeds=2)
    squares = ring.ring_rates(shapes_model, library, "square", weights=(1.0,), seeds=2)
    assert circles[0.0] <= 0.1 and circles[1.0] >= 0.8, circles
    assert squares[1.0] <= 0.2, squares
    shapes_model.loras.use(shapes_model.pipe, [], library)


def test_weight_zero_draws_shapes_sd_itself_byte_for_byte(shapes_model):
    from workers.shapes.quality import item

    library = LoraLibrary(None)
    plain = render.render(shapes_model, [item("a red circle on a white background", 3)], None, loras=library)[0]
    zero = render.render(shapes_model, [item(f"a red circle on a white background <lora:{ring.NAME}:0>", 3)],
                         None, loras=library)[0]
    assert zero.tobytes() == plain.tobytes()
    assert not analysis.has_hole(analysis.read(plain).mask)


def test_the_trainer_writes_a_lora_the_farm_applies(tmp_path, shapes_model):
    out = tmp_path / f"{ring.NAME}.safetensors"
    ring.train(out, ring.Recipe(steps=2, batch=4))
    lora = LoraFile.read(out)
    assert len(lora.layers) == len(ring.targets(shapes_model.pipe.unet))
    library = LoraLibrary(tmp_path)
    try:
        # The up matrices start at zero: two steps move them off it, so the weights change.
        before = {m: m.weight.detach().clone() for m in ring.targets(shapes_model.pipe.unet).values()}
        shapes_model.loras.use(shapes_model.pipe, [LoraRef(ring.NAME, 1.0, 1.0)], library)
        changed = sum(not torch.equal(m.weight, w) for m, w in before.items())
        assert changed == len(before)
    finally:
        shapes_model.loras.use(shapes_model.pipe, [], library)


def test_ring_pictures_have_holes_and_discs_do_not():
    circle = world.Scene((world.Shape("circle", "red", 10, 10, 30),), "white")
    assert analysis.has_hole(analysis.read(circle.draw(rings=True)).mask)
    assert not analysis.has_hole(analysis.read(circle.draw()).mask)

