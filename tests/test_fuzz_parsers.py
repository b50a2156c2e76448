"""Fuzzing of every parser a user's text goes through: section specs (`0:a;;;1-2:b`), `--latent_paddings`,
`--one_frame_inference` options, timed prompts (`[0s: a] [2s-3.5s: b]`), prompt-file / sample-prompt lines
(`a cat --w 640 --d 14`) and dataset config files (TOML, JSON).

Property: for any text, including near-valid specs with huge, negative, duplicated or non-ASCII numbers, each parser
returns a valid, bounded result or raises its own validation error class; nothing else (IndexError, OverflowError,
MemoryError, KeyError, RecursionError, ...) escapes. Valid inputs built from known values parse back to them.
Every test is derandomized (a fixed sequence of examples) with a bounded example count.
"""

import json
import logging
import math
import os
import string
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataset.config import (
    GENERAL_KEYS,
    IMAGE_KEYS,
    MAX_CONFIG_INTEGER,
    MAX_RESOLUTION_SIDE,
    VIDEO_KEYS,
    DatasetConfigError,
    load_dataset_params,
    validate_user_config,
)
from frame_pack.sampling import MAX_INFER_STEPS
from frame_pack.sections import (
    MAX_ONE_FRAME_INDEX,
    MAX_SECTIONS,
    OneFrameOptions,
    SectionSpecError,
    one_frame_indices,
    parse_latent_paddings,
    parse_one_frame_options,
    parse_section_spec,
    plan_sections,
)
from frame_pack.timed_prompts import TimedPromptError, parse_timed_prompt, section_prompts
from pipelines import generate_args
from pipelines.prompt_line import LEADING_OPTION_RE, PromptLineError
from tests.factory.datasets import toml_text
from training import sample_prompts

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=60, deadline=None, derandomize=True)

# numbers as a user might mistype them: small, negative, 20-digit, 5000-digit, non-ASCII digits, floats, nan/inf
number_texts = st.one_of(
    st.integers(-5, 12).map(str),
    st.integers(-(10**25), 10**25).map(str),
    st.sampled_from(
        ["", " ", "-", "+3", " 7 ", "00", "-0", "1_000", "0x10", "1e3", "2.5", "nan", "inf", "-inf", "٣", "９", "²"]
    ),
    st.sampled_from(
        ["1" * 20, "9" * 5000, "100000000", str(MAX_SECTIONS), str(MAX_SECTIONS - 1), "-" + str(MAX_SECTIONS)]
    ),
)
words = st.text(alphabet=string.ascii_letters + " :.-[]\\/é", max_size=8)
any_text = st.one_of(st.text(max_size=60), st.text(alphabet=";:-0123456789 ab[]s.,=", max_size=40))


def parsed_or_refused(parse, text, *errors):
    """``parse(text)``, or None when it raised one of ``errors`` with a message; any other exception escapes."""
    try:
        return parse(text)
    except errors as e:
        assert str(e)
        return None


# ------------------------------------------------------------------------------------------------ section specs


@st.composite
def near_valid_section_specs(draw):
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        start, end = draw(number_texts), draw(st.one_of(st.none(), number_texts))
        spec = start if end is None else f"{start}-{end}"
        form = draw(st.sampled_from(["{spec}:{text}", "{text}", ":{text}", "{spec}", "", "  {spec} : {text} "]))
        parts.append(form.format(spec=spec, text=draw(words)))
    return ";;;".join(parts) + draw(st.sampled_from(["", ";;;", ";;", ";;;;;;"]))


@FUZZ
@given(st.one_of(near_valid_section_specs(), any_text))
def test_section_spec_parser_only_raises_its_error_and_stays_bounded(text):
    entries = parsed_or_refused(parse_section_spec, text, SectionSpecError)
    if entries is None:
        return
    assert 0 in entries and len(entries) <= 2 * MAX_SECTIONS
    assert all(isinstance(k, int) and -MAX_SECTIONS <= k < MAX_SECTIONS for k in entries)
    assert all(isinstance(v, str) for v in entries.values())


@st.composite
def section_maps(draw):
    """Disjoint index ranges with their texts -> (spec text, expected {index: text})."""
    cuts = sorted(draw(st.sets(st.integers(-MAX_SECTIONS, MAX_SECTIONS), min_size=2, max_size=8)))
    parts, expected = [], {}
    for lo, hi in zip(cuts, cuts[1:]):
        if not draw(st.booleans()):
            continue
        text = draw(st.text(alphabet=string.ascii_letters + " ,.!", min_size=1, max_size=6)).strip() or "x"
        last = hi - 1
        parts.append(f"{lo}:{text}" if lo == last else f"{lo}-{last}:{text}")
        expected.update(dict.fromkeys(range(lo, last + 1), text))
    if not parts:
        parts, expected = ["0:x"], {0: "x"}
    order = draw(st.permutations(parts))
    if 0 not in expected:
        non_negative = [i for i in expected if i >= 0]
        expected[0] = expected[min(non_negative) if non_negative else min(expected)]
    return ";;;".join(order) + ";;;", expected  # the trailing empty part makes even one part a section spec


@ROUND_TRIP
@given(section_maps())
def test_section_spec_built_from_ranges_parses_back(spec_and_expected):
    text, expected = spec_and_expected
    assert parse_section_spec(text) == expected


@ROUND_TRIP
@given(st.integers(-50, 50), st.integers(0, 5), st.integers(0, 5))
def test_an_index_given_twice_is_refused_naming_it(start, length, offset):
    overlap = start + min(offset, length)
    text = f"{start}-{start + length}:a;;;{overlap}:b"
    with pytest.raises(SectionSpecError, match=rf"section {overlap} is given twice"):
        parse_section_spec(text)


@FUZZ
@given(
    st.one_of(near_valid_section_specs(), any_text), st.integers(1, 12), st.integers(1, 9), st.sampled_from([24, 30])
)
def test_section_prompts_of_either_syntax_only_raise_validation_errors(text, sections, lws, fps):
    try:
        prompts = section_prompts(text, sections, lws, fps)
    except (SectionSpecError, TimedPromptError):
        return
    assert len(prompts) == sections and all(isinstance(p, str) for p in prompts)


# ------------------------------------------------------------------------------------------------ latent paddings


@FUZZ
@given(st.one_of(st.lists(number_texts, min_size=1, max_size=12).map(",".join), any_text))
def test_latent_paddings_parser_only_raises_its_error_and_plans_cheaply(text):
    try:
        paddings = parse_latent_paddings(text)
    except SectionSpecError as e:
        assert str(e).startswith("--latent_paddings")
        return
    assert all(0 <= p <= MAX_SECTIONS for p in paddings) and len(paddings) <= MAX_SECTIONS
    plans = plan_sections(3, 9, latent_paddings=paddings)  # allocates at most (MAX_SECTIONS + 3) * 9 indices
    assert [p.latent_padding for p in plans] == (paddings + [2, 1, 0][len(paddings) :])[:3]


@ROUND_TRIP
@given(st.lists(st.integers(0, MAX_SECTIONS), min_size=1, max_size=20), st.sampled_from([",", ", ", " , "]))
def test_latent_paddings_round_trip(paddings, separator):
    assert parse_latent_paddings(separator.join(map(str, paddings))) == paddings


def test_latent_paddings_limits():
    with pytest.raises(SectionSpecError, match="got 100000000"):
        parse_latent_paddings("100000000")
    with pytest.raises(SectionSpecError, match="1001 values"):
        parse_latent_paddings(",".join(["0"] * (MAX_SECTIONS + 1)))
    with pytest.raises(SectionSpecError, match=r"got 99999999999999999999\b"):
        parse_latent_paddings("99999999999999999999")


# ------------------------------------------------------------------------------------------------ one-frame options

one_frame_tokens = st.one_of(
    st.sampled_from(["no_2x", "no_4x", "no_post", "default", "", " ", "zero_post", "no_2x=1", "target_index", "=3"]),
    st.builds("target_index={}".format, number_texts),
    st.builds("control_index={}".format, st.lists(number_texts, min_size=1, max_size=4).map(";".join)),
)


@FUZZ
@given(st.one_of(st.lists(one_frame_tokens, min_size=1, max_size=6).map(",".join), any_text), st.integers(0, 3))
def test_one_frame_options_parser_only_raises_its_error(text, controls):
    options = parsed_or_refused(parse_one_frame_options, text, SectionSpecError)
    if options is None:
        return
    indices = options.control_indices + (() if options.target_index is None else (options.target_index,))
    assert all(0 <= i <= MAX_ONE_FRAME_INDEX for i in indices)
    layout = one_frame_indices(9, controls, options)  # int64 tensors: no overflow for any accepted index
    assert layout.latent_indices.tolist() == [9 if options.target_index is None else options.target_index]


@ROUND_TRIP
@given(
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, MAX_ONE_FRAME_INDEX)),
    st.lists(st.integers(0, MAX_ONE_FRAME_INDEX), max_size=4),
    st.randoms(use_true_random=False),
)
def test_one_frame_options_round_trip(no_2x, no_4x, no_post, target, controls, rng):
    expected = OneFrameOptions(no_2x, no_4x, no_post, target, tuple(controls))
    tokens = [name for name, on in (("no_2x", no_2x), ("no_4x", no_4x), ("no_post", no_post)) if on]
    tokens += [] if target is None else [f"target_index={target}"]
    tokens += [f"control_index={';'.join(map(str, controls))}"] if controls else []
    rng.shuffle(tokens)
    assert parse_one_frame_options(",".join(tokens or ["default"])) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("target_index=-5", r"'target_index=-5'.*>= 0"),
        ("control_index=0;-1", r"'control_index=0;-1'.*>= 0"),
        ("target_index=99999999999999999999", "target_index=99999999999999999999"),
        ("no_2x,zero_post", "unknown one-frame option 'zero_post'"),
        ("target_index=1;2", "give one index"),
    ],
)
def test_one_frame_options_refused(text, message):
    with pytest.raises(SectionSpecError, match=message):
        parse_one_frame_options(text)


# ------------------------------------------------------------------------------------------------ timed prompts

times = st.one_of(number_texts, st.builds("{}.{}".format, st.integers(0, 99), st.integers(0, 99)))


@st.composite
def near_valid_timed_prompts(draw):
    tokens = []
    for _ in range(draw(st.integers(1, 4))):
        start, end = draw(times), draw(st.one_of(st.none(), times))
        span = f"{start}s" if end is None else f"{start}s-{end}s"
        form = draw(st.sampled_from(["[{span}: {text}]", "[{span}:{text}", "[{span}]", "{span}: {text}]", "[{span}:]"]))
        tokens.append(form.format(span=span, text=draw(words)))
    return draw(st.sampled_from(["", "lead ", "[", "]"])) + " ".join(tokens)


@FUZZ
@given(st.one_of(near_valid_timed_prompts(), any_text))
def test_timed_prompt_parser_only_raises_its_error(text):
    timed = parsed_or_refused(parse_timed_prompt, text, TimedPromptError)
    if timed is None:
        return
    assert all(t.text and t.start >= 0 and (t.end is None or t.end > t.start) for t in timed.tokens)
    starts = [t.start for t in timed.tokens]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


@pytest.mark.parametrize("text", ["[" + "9" * 5000 + "s: a]", "[0s-" + "1" * 40 + "s: a]", "[٣s: a]"])
def test_timed_prompt_with_absurd_times_is_refused(text):
    with pytest.raises(TimedPromptError, match="timed prompt token"):
        parse_timed_prompt(text)


@FUZZ
@given(near_valid_timed_prompts(), st.integers(1, 12), st.integers(1, 9), st.sampled_from([8, 30, 60]))
def test_timed_section_prompts_only_raise_validation_errors(text, sections, lws, fps):
    try:
        prompts = section_prompts(text, sections, lws, fps)
    except (TimedPromptError, SectionSpecError):
        return
    assert len(prompts) == sections


# ------------------------------------------------------------------------------------------------ prompt lines

option_names = st.sampled_from(sorted(generate_args.INLINE_OPTIONS) + sorted(sample_prompts.LINE_OPTIONS) + ["x", ""])
option_values = st.one_of(number_texts, words, st.just(""))


@st.composite
def near_valid_prompt_lines(draw):
    line = draw(st.sampled_from(["", "a cat", " --", "--", "a -- b", "  "])) + draw(words)
    for _ in range(draw(st.integers(0, 4))):
        name = draw(option_names)
        if draw(st.booleans()):
            name = name.upper()
        line += f" --{name} {draw(option_values)}"
    return line


@FUZZ
@given(st.one_of(near_valid_prompt_lines(), any_text))
def test_generation_prompt_line_parser_only_raises_its_error(line):
    parsed = parsed_or_refused(generate_args.parse_prompt_line, line, PromptLineError)
    if parsed is None:
        return
    assert parsed["prompt"] and not LEADING_OPTION_RE.match(parsed["prompt"])  # "--" alone or "---" is text
    assert set(parsed) - {"prompt"} <= set(generate_args.INLINE_OPTIONS)


@FUZZ
@given(st.one_of(near_valid_prompt_lines(), any_text))
def test_training_sample_prompt_line_parser_only_raises_its_error(line):
    logging.disable(logging.ERROR)  # bad options are logged and ignored; thousands of log lines help no one here
    try:
        parsed = sample_prompts.parse_prompt_line(line)
    except PromptLineError as e:
        assert "starts with the option" in str(e)
        return
    finally:
        logging.disable(logging.NOTSET)
    fields = {option.field for option in sample_prompts.LINE_OPTIONS.values()}
    assert set(parsed) - {"prompt"} <= fields
    assert 1 <= parsed.get("sample_steps", 1) <= MAX_INFER_STEPS


plain_prompts = st.text(alphabet=string.ascii_letters + string.digits + " ,.!:;-é", min_size=1, max_size=30).filter(
    lambda p: p.strip() and " --" not in p and not p.strip().startswith("--") and not p.endswith(" -")
)


@ROUND_TRIP
@given(
    plain_prompts,
    st.dictionaries(st.sampled_from(["w", "h", "d", "s", "vs", "n_seeds"]), st.integers(1, 10**6), max_size=4),
    st.dictionaries(st.sampled_from(["f", "g", "mct"]), st.floats(0.1, 100.0, allow_nan=False), max_size=2),
)
def test_prompt_line_round_trip(prompt, ints, floats):
    line = prompt + "".join(f" --{k} {v!r}" for k, v in {**ints, **floats}.items())
    assert generate_args.parse_prompt_line(line) == {"prompt": prompt.strip(), **ints, **floats}


@pytest.mark.parametrize("line", ["--d 14", "  --w 640 --h 480 a cat", "--N low quality"])
def test_a_line_that_starts_with_an_option_is_refused(line):
    with pytest.raises(PromptLineError, match="starts with the option --"):
        generate_args.parse_prompt_line(line)
    with pytest.raises(PromptLineError, match="starts with the option --"):
        sample_prompts.parse_prompt_line(line)


# ------------------------------------------------------------------------------------------------ dataset configs

scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, 16, 30, 640, 10**18]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    st.sampled_from(["v", "img", "head", "chunk", "slide", "uniform", "full"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(sorted({**GENERAL_KEYS, **IMAGE_KEYS, **VIDEO_KEYS})), st.text(max_size=6))
tables = st.dictionaries(keys, values, max_size=6)
configs = st.one_of(
    st.fixed_dictionaries({}, optional={"general": tables, "datasets": st.lists(tables, max_size=3),
                                        "validation_datasets": st.lists(tables, max_size=2)}),
    st.dictionaries(st.text(max_size=8), values, max_size=3),
)  # fmt: skip


def _load_text(text: str, suffix: str):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config" + suffix)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return load_dataset_params(path, {"batch_size": 1})


@FUZZ
@given(configs, st.sampled_from([".toml", ".json"]), st.data())
def test_dataset_config_loader_only_raises_its_error(config, suffix, data):
    text = toml_text(config) if suffix == ".toml" else json.dumps(config)
    if data.draw(st.booleans()):  # damage the file: cut it, or splice random text in
        cut = data.draw(st.integers(0, len(text)))
        text = (
            text[:cut] + data.draw(st.sampled_from(["", "[", "]]", "=", '"', "[[datasets]]", "\x00", "é"])) + text[cut:]
        )
    try:
        params = _load_text(text, suffix)
    except DatasetConfigError as e:
        assert os.path.basename(e.file or "").startswith("config")
        return
    assert params and all(1 <= p.batch_size <= MAX_CONFIG_INTEGER for p in params)
    assert all(16 <= side <= MAX_RESOLUTION_SIDE for p in params for side in p.resolution)
    assert all(1 <= p.num_repeats <= MAX_CONFIG_INTEGER for p in params)
    for p in params:
        assert getattr(p, "source_fps", None) is None or math.isfinite(p.source_fps)


@FUZZ
@given(configs)
def test_dataset_config_validation_of_parsed_values_only_raises_its_error(config):
    try:
        validate_user_config(config, "c.toml")
    except DatasetConfigError as e:
        assert str(e).startswith("c.toml")


valid_entries = st.one_of(
    st.fixed_dictionaries(
        {"image_directory": st.sampled_from(["a", "b/c"])},
        optional={"resolution": st.integers(16, 2048), "batch_size": st.integers(1, 64), "enable_bucket": st.booleans(),
                  "fp_1f_clean_indices": st.lists(st.integers(0, 40), min_size=1, max_size=3)},
    ),
    st.fixed_dictionaries(
        {"video_directory": st.sampled_from(["v", "w/x"])},
        optional={"target_frames": st.lists(st.integers(1, 129), min_size=1, max_size=3),
                  "frame_extraction": st.sampled_from(["head", "chunk", "slide", "uniform", "full"]),
                  "source_fps": st.floats(1.0, 120.0),
                  "resolution": st.lists(st.integers(16, 2048), min_size=2, max_size=2)},
    ),
)  # fmt: skip


@ROUND_TRIP
@given(
    st.lists(
        valid_entries, min_size=1, max_size=3, unique_by=lambda e: e.get("image_directory", e.get("video_directory"))
    )
)
def test_valid_dataset_config_reads_the_same_from_toml_and_json(entries):  # fmt: skip
    config = {"general": {"caption_extension": ".txt"}, "datasets": entries}
    from_toml = _load_text(toml_text(config), ".toml")
    assert from_toml == _load_text(json.dumps(config), ".json")
    assert [p.batch_size for p in from_toml] == [e.get("batch_size", 1) for e in entries]
    assert [p.caption_extension for p in from_toml] == [".txt"] * len(entries)


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("[[datasets]]\nimage_directory = " + "[" * 100_000, ".toml", "nested too deeply"),
        ("[[datasets]]\nbatch_size = " + "1" * 5000, ".toml", "4300 digits"),
        ("[[datasets]]\nimage_directory = 'x'\nbatch_size = = 3\n", ".toml", r"line 3, column 14"),
        ('{"datasets": ' + "[" * 100_000, ".json", "nested too deeply"),
        ('{"datasets": [{"batch_size": ' + "1" * 5000 + "}]}", ".json", "4300 digits"),
        ("[[datasets]]\nvideo_directory = 'v'\nsource_fps = inf\n", ".toml", "finite float > 0, got inf"),
    ],
)
def test_dataset_config_damage_is_reported_naming_the_file(text, suffix, message):
    with pytest.raises(DatasetConfigError, match=message) as info:
        _load_text(text, suffix)
    assert info.value.file.endswith("config" + suffix)


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"image_directory": "i", "num_repeats": 10**18}, "num_repeats"),
        ({"video_directory": "v", "target_frames": [25, 10**9]}, "target_frames"),
        ({"video_directory": "v", "frame_sample": 2**62}, "frame_sample"),
        ({"image_directory": "i", "resolution": [10**6, 16]}, "resolution"),
        ({"image_directory": "i", "fp_1f_clean_indices": [0, 10**12]}, "fp_1f_clean_indices"),
    ],
)
def test_dataset_config_counts_are_bounded(entry, key):
    with pytest.raises(DatasetConfigError, match=r"<= |\.\. ") as info:
        _load_text(toml_text({"datasets": [entry]}), ".toml")
    assert info.value.key == key
