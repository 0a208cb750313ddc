from farm import infotext

PARAMS = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1,
          "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly"}


def test_written_exactly_as_the_webui_writes_it():
    text = infotext.build("a castle", "blurry", PARAMS, version="v1.10.1")
    assert text == (
        "a castle\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
    )


def test_negative_line_only_when_not_empty_and_keys_in_webui_order():
    shuffled = dict(reversed(list(PARAMS.items())))
    text = infotext.build("a castle", "", {**shuffled, "CFG scale": 4.5}, version="v1")
    assert "Negative prompt" not in text
    assert text.splitlines()[1].startswith("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5,")


def test_values_with_commas_colons_or_newlines_are_json_quoted():
    text = infotext.build("p", "", {**PARAMS, "Model": "my,model: v2"}, version="v1")
    assert 'Model: "my,model: v2"' in text
    assert infotext.parse(text)["Model"] == "my,model: v2"


def test_round_trip_through_the_webui_pattern():
    text = infotext.build("a red, circle\nsecond line", "ugly\nbad", PARAMS, version="v1.10.1")
    parsed = infotext.parse(text)
    assert parsed["Prompt"] == "a red, circle\nsecond line"
    assert parsed["Negative prompt"] == "ugly\nbad"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "512")
    for key in ("Steps", "Sampler", "Schedule type", "Seed", "Model hash", "Model"):
        assert parsed[key] == str(PARAMS[key])
    assert parsed["CFG scale"] == "7"


def test_prompt_alone_is_not_mistaken_for_parameters():
    parsed = infotext.parse("just a prompt, with: one colon")
    assert parsed["Prompt"] == "just a prompt, with: one colon"


def test_every_key_read_back_gives_the_value_the_item_wrote():
    from farm.plan import Item

    item = Item(index=0, prompt="a (red:1.2) circle", negative_prompt="blurry", seed=123, model="tiny-sd",
                mode="txt2img", sampler="DPM++ 2M", schedule_type="Karras", steps=17, cfg_scale=6.5, width=64,
                height=96, clip_skip=2, emphasis="No norm", variation_seed=9, variation_strength=0.25)
    parsed = infotext.parse(infotext.for_item(item, model_name="tiny-sd", model_hash="0123456789", version="v"))
    assert set(infotext.READ_BACK) == {"Steps", "Sampler", "Schedule type", "CFG scale", "Clip skip", "Emphasis",
                                       "Variation seed", "Variation seed strength"}
    for key, (field, read) in infotext.READ_BACK.items():
        assert read(parsed[key]) == getattr(item, field), key
    assert (parsed["Seed"], parsed["Size-1"], parsed["Size-2"]) == ("123", "64", "96")
