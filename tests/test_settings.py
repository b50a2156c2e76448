"""Generation settings: built once from the flags or a prompt line, frozen, defaults shared with the parser."""

import dataclasses

import pytest

from pipelines.generate_args import apply_prompt_line, build_parser, parse_prompt_line
from pipelines.settings import GenerationSettings, ModelSettings


def test_flag_defaults_are_the_settings_defaults():
    args = build_parser().parse_args([])
    assert GenerationSettings.from_args(args) == GenerationSettings()
    assert ModelSettings.from_args(args) == ModelSettings()


def test_settings_from_flags_are_frozen_and_hold_tuples():
    args = build_parser().parse_args(
        ["--video_size", "480", "832", "--control_image_path", "a.png", "b.png", "--seed", "3", "--f1"]
    )
    settings = GenerationSettings.from_args(args)
    assert (settings.height, settings.width, settings.seed, settings.f1) == (480, 832, 3, True)
    assert settings.control_image_path == ("a.png", "b.png")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 4


def test_prompt_line_overrides_only_its_options():
    base = GenerationSettings(video_size=(256, 256), infer_steps=25, seed=1, negative_prompt="blurry")
    line = apply_prompt_line(base, parse_prompt_line("a dog --w 320 --s 4 --d 9"))
    assert line == base.replace(prompt="a dog", video_size=(256, 320), infer_steps=4, seed=9)
    assert base.prompt is None and base.video_size == (256, 256)  # the base is untouched
    with pytest.raises(ValueError, match="--s must be > 0"):
        apply_prompt_line(base, parse_prompt_line("a dog --s 0"))


@pytest.mark.parametrize(
    "flags, expected",
    [([], ()), (["--lora_weight", "a", "b"], (1.0, 1.0)), (["--lora_weight", "a", "b", "--lora_multiplier", "0.5"],
     (0.5, 0.5)), (["--lora_weight", "a", "b", "--lora_multiplier", "0.5", "0.25"], (0.5, 0.25))],
)  # fmt: skip
def test_one_lora_multiplier_per_lora_file(flags, expected):
    assert ModelSettings.from_args(build_parser().parse_args(flags)).lora_multiplier == expected
