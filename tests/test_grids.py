"""Grids that read like the webui's X/Y/Z plot: the labels are drawn where the layout says (their
strips hold ink), wrapped and never cut; the size is what the tiles and strips add up to; missing
images are labelled cells; a grid too large says how to split it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from bench.export import make_job
from farm import grids
from farm.store import LocalStore
from farm.stored import StoredJob
from tests.conftest import run_farm

JOB = "grid-20261203-120000-abcdef"


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> StoredJob:
    store = LocalStore(tmp_path_factory.mktemp("store"))
    # 4 prompts x 3 seeds; item 4 failed and 7 is still to render.
    make_job(store, JOB, 12, failed=(4,), missing=(7,))
    return StoredJob(store, JOB)


def _ink(picture: Image.Image, box) -> int:
    region = np.asarray(picture.convert("L").crop(box))
    return int((region < 128).sum())


def test_every_label_is_drawn_in_its_strip_and_the_cells_tile_the_rest(job):
    picture, layout = grids.job_grid(job)
    tw, th = layout.tile
    assert tw == th == grids.MIN_TILE  # 64-pixel images, enlarged for their labels
    texts = [text for _, text in layout.labels]
    assert texts[:3] == ["Seed: 1", "Seed: 2", "Seed: 3"]
    assert texts[3:] == [f"a {c} circle on a white background" for c in ("red", "blue", "green", "purple")]
    for box, text in layout.labels:
        assert box[3] > box[1] and _ink(picture, box) > 20, text
    lefts = sorted({box[0] for box, _, _ in layout.cells})
    tops = sorted({box[1] for box, _, _ in layout.cells})
    assert len(lefts) == 3 and len(tops) == 4
    assert all(b - a == tw for a, b in zip(lefts, lefts[1:])) and all(b - a == th for a, b in zip(tops, tops[1:]))
    assert picture.size == (lefts[-1] + tw, tops[-1] + th)  # labels left and above, nothing beyond
    assert all(box[2] <= lefts[0] for box, text in layout.labels if not text.startswith("Seed"))
    assert all(box[3] <= tops[0] for box, text in layout.labels if text.startswith("Seed"))


def test_missing_images_are_empty_cells_labelled_missing(job):
    picture, layout = grids.job_grid(job)
    missing = {index: box for box, index, stored in layout.cells if not stored}
    assert set(missing) == {4, 7}
    for box in missing.values():
        assert picture.getpixel((box[0] + 3, box[1] + 3)) == grids.MISSING
        assert _ink(picture, box) > 20  # the word "missing"


def test_long_labels_wrap_over_lines_and_keep_every_character():
    face = grids.font(14)
    assert isinstance(face, ImageFont.FreeTypeFont)
    text = "a purple triangle and an orange circle on a gray background, highly detailed, (masterpiece:1.2)"
    lines = grids.wrap(text, face, 150)
    assert len(lines) > 3 and all(face.getlength(line) <= 150 for line in lines)
    assert " ".join(lines) == text
    assert "".join(grids.wrap("x" * 80, face, 50)) == "x" * 80  # a word wider than the column breaks


def test_three_axes_make_one_labelled_grid_per_z_value(tmp_path):
    store = LocalStore(tmp_path)
    make_job(store, JOB, 8)
    job = StoredJob(store, JOB)
    x, y, z, fixed = grids.sides(job, x=["seed"], y=["prompt"], z=[])
    assert [n for n, _ in y.axes] == ["prompt"]
    with pytest.raises(grids.GridError, match="no axis 'cfg' in this job; it has prompt, seed"):
        grids.sides(job, x=["cfg"])
    x, y, z, fixed = grids.sides(job, x=["prompt"], y=[], z=["seed"], where={})
    picture, layout = grids.draw(job, x, y, z, fixed)
    titles = [text for _, text in layout.labels if text.startswith("Seed")]
    assert titles == ["Seed: 1", "Seed: 2"]
    assert len({box[0] for box, _, _ in layout.cells}) == 8  # 4 prompts across, in each of 2 grids
    only = grids.draw(job, *grids.sides(job, x=["prompt"], where={"seed": "2"}))[1]
    assert [index for _, index, _ in only.cells] == [1, 3, 5, 7]


def test_a_grid_too_large_for_its_limit_says_how_to_split_it(job):
    with pytest.raises(grids.GridError, match="split it: --where AXIS=VALUE"):
        grids.job_grid(job, max_side=100)


def test_farm_grid_draws_a_stored_job_from_the_command_line(job, tmp_path):
    result = run_farm("grid", JOB, "--x", "prompt", "--y", "seed", "--out", str(tmp_path / "g.png"),
                      "--store", str(job.store.root), env={"FARM_BROKER_URL": ""})
    assert result.returncode == 0, result.stderr
    assert "12 images, 2 missing" in result.stdout
    assert Image.open(tmp_path / "g.png").width > 4 * grids.MIN_TILE
    wrong = run_farm("grid", JOB, "--where", "seed=99", "--store", str(job.store.root), env={"FARM_BROKER_URL": ""})
    assert wrong.returncode == 2 and "no such value; it has Seed: 1, Seed: 2, Seed: 3" in wrong.stderr
