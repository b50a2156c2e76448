"""Bad input to fpack_generate_video.py: each mistake is one `error:` line (exit 2), early, with nothing written.

The first tests feed damaged weight files to the safetensors readers every loader goes through; the rest run the
real entry script as subprocesses on the tiny factory models.
"""

import json
import os
import re
import shlex
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.latent_file import load_latent, save_latent
from tests.badinput import PAUSED, assert_interrupted, files_under, held_up, interrupt_when
from utils.cli import UsageError
from utils.safetensors_utils import (
    WeightFileError,
    load_safetensors,
    load_state_dict,
    read_header,
    resolve_weight_files,
    save_safetensors,
)


def packed(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


DAMAGED_SAFETENSORS = {
    "text file": (b"just some notes\nnot weights\n", "bad header length"),
    "empty file": (b"", "too short"),
    "header not JSON": (struct.pack("<Q", 4) + b"\xff\xfe{[", "not valid JSON"),
    "header a list": (packed([1, 2]), "not a JSON object"),
    "entry without shape": (packed({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4), "'w'"),
    "shape not a list": (packed({"w": {"dtype": "F32", "shape": 3, "data_offsets": [0, 4]}}, b"\0" * 4), "'w'"),
    "size disagrees with shape": (
        packed({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        "'w'",
    ),
    "bad metadata": (packed({"__metadata__": {"a": 1}}), "__metadata__"),
    "truncated data": (packed({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4), "truncated"),
}


@pytest.mark.parametrize("case", DAMAGED_SAFETENSORS)
def test_damaged_safetensors_are_refused_naming_the_flag_and_file(tmp_path, case):
    raw, reason = DAMAGED_SAFETENSORS[case]
    path = tmp_path / "w.safetensors"
    path.write_bytes(raw)
    for read in (lambda: read_header(path, "--dit"), lambda: load_state_dict(str(path), flag="--dit"),
                 lambda: load_safetensors(path, "--dit")):  # fmt: skip
        with pytest.raises(WeightFileError) as err:
            read()
        assert str(err.value).startswith(f"--dit {path}: ") and reason in str(err.value)


def test_a_sound_file_still_loads_with_its_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": torch.arange(6.0).reshape(2, 3)}, path, metadata={"k": "v"})
    infos, metadata = read_header(path)
    assert infos["w"].shape == (2, 3) and metadata == {"k": "v"}
    tensors, metadata = load_safetensors(path)
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3)) and metadata == {"k": "v"}


def test_a_corrupted_shard_index_is_refused_naming_it(tmp_path):
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"w": "model-0000')
    with pytest.raises(WeightFileError, match=f"--vae {index}: unreadable shard index"):
        resolve_weight_files(tmp_path, "--vae")
    index.write_text('{"weight_map": ["model-00001-of-00001.safetensors"]}')
    with pytest.raises(WeightFileError, match="weight_map is not a map"):
        resolve_weight_files(tmp_path, "--vae")


@pytest.mark.parametrize("name, raw", [("notes.txt", b"hello\n"), ("latent.pt", b"PK\3\4 broken zip"),
                                       ("latent.safetensors", b"\x10\0\0\0\0\0\0\0{}")])  # fmt: skip
def test_a_file_that_is_not_a_latent_is_refused_as_such(tmp_path, name, raw):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(WeightFileError) as err:
        load_latent(str(path))
    assert str(err.value).startswith(f"--latent_path {path}: ")


def test_a_latent_without_the_latent_key_or_of_the_wrong_shape_is_refused(tmp_path):
    save_safetensors({"other": torch.zeros(16, 1, 2, 2)}, tmp_path / "a.safetensors")
    with pytest.raises(WeightFileError, match="no tensor named 'latent'"):
        load_latent(str(tmp_path / "a.safetensors"))
    save_latent(torch.zeros(8, 1, 2, 2), str(tmp_path / "b.safetensors"), None)
    with pytest.raises(WeightFileError, match=r"expected a \(16, T, h, w\) latent, got \(8, 1, 2, 2\)"):
        load_latent(str(tmp_path / "b.safetensors"))
    save_latent(torch.ones(16, 1, 2, 2), str(tmp_path / "c.safetensors"), {"k": "v"})
    latent, meta = load_latent(str(tmp_path / "c.safetensors"))
    assert torch.equal(latent, torch.ones(16, 1, 2, 2)) and meta == {"k": "v"}


# ---- through the entry script ------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the loaders log when a model or tokenizer starts loading (none of it may appear for a refused input).
LOADING = re.compile(r"Loading |Loaded |DiT from |VAE from |models: ")


@dataclass(frozen=True)
class Bad:
    """One bad input: extra flags (`{name}` fields filled from the fixture's files) and what the error must name."""

    flags: str
    names: tuple[str, ...]
    before_loading: bool = True


def start_image(path):
    Image.new("RGB", (48, 32), (200, 40, 40)).save(path)
    return path


def truncated_copy(source, target, keep: float = 0.5):
    data = Path(source).read_bytes()
    Path(target).write_bytes(data[: int(len(data) * keep)])
    return target


@pytest.fixture(scope="module")
def bad_files(models, tmp_path_factory):
    """Damaged and foreign files for every slot, plus a sound start image and control images."""
    from tests.factory.dit import tiny_dit_config
    from tests.factory.lora import framepack_lora

    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("a text file, not weights\n")
    (d / "notes.mp4").write_text("a text file, not a video\n")
    (d / "notes.png").write_text("a text file, not an image\n")
    (d / "malformed.safetensors").write_bytes(packed({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4))
    (d / "huge_header.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    truncated_copy(models.dit, d / "dit_truncated.safetensors")
    truncated_copy(models.text_encoder2, d / "clip_truncated.safetensors", keep=0.9)
    index_folder = d / "vae_bad_index"
    index_folder.mkdir()
    save_safetensors({"w": torch.zeros(2)}, index_folder / "diffusion_pytorch_model-00001-of-00001.safetensors")
    (index_folder / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": {"w": ')
    config = tiny_dit_config()
    save_safetensors(framepack_lora(config), d / "lora.safetensors")
    truncated_copy(d / "lora.safetensors", d / "lora_truncated.safetensors")
    wider = tiny_dit_config(attention_head_dim=2 * config.attention_head_dim)
    save_safetensors(framepack_lora(wider), d / "lora_other_dit.safetensors")
    save_latent(torch.zeros(16, 2, 4, 6), str(d / "latent.safetensors"), None)
    truncated_copy(d / "latent.safetensors", d / "latent_truncated.safetensors", keep=0.8)
    start_image(d / "start.png")
    start_image(d / "control.png")
    start_image(d / "mask.png")
    (d / "a_file").write_text("not a folder\n")
    (d / "comments.txt").write_text("# only a comment\n\n   # and another\n")
    (d / "bad_lines.txt").write_text(
        f"# header\na cat --d 99999999999999999999999 --i {d / 'start.png'}\n--d 14 a dog --i {d / 'start.png'}\n"
        f"a bird --zz 3 --i {d / 'start.png'}\na fish --vs 100000000 --i {d / 'start.png'}\n"
    )
    return d


BAD = {
    # model files
    "dit is a VAE": Bad("--dit {vae}", ("--dit", "{vae}")),
    "dit is a text file": Bad("--dit {d}/notes.txt", ("--dit", "notes.txt")),
    "dit truncated": Bad("--dit {d}/dit_truncated.safetensors", ("--dit", "truncated")),
    "dit missing": Bad("--dit {d}/missing.safetensors", ("--dit", "missing.safetensors")),
    "vae is the DiT": Bad("--vae {dit}", ("--vae", "{dit}")),
    "vae with corrupted shard index": Bad("--vae {d}/vae_bad_index", ("--vae", "index.json")),
    "text_encoder1 is a text file": Bad("--text_encoder1 {d}/notes.txt", ("--text_encoder1", "notes.txt")),
    "text_encoder1 malformed header": Bad(
        "--text_encoder1 {d}/malformed.safetensors", ("--text_encoder1", "malformed")
    ),
    "text_encoder2 is the DiT": Bad("--text_encoder2 {dit}", ("--text_encoder2", "{dit}")),
    "text_encoder2 truncated": Bad("--text_encoder2 {d}/clip_truncated.safetensors", ("--text_encoder2", "truncated")),
    "image_encoder is CLIP": Bad("--image_encoder {text_encoder2}", ("--image_encoder", "{text_encoder2}")),
    "image_encoder header too large": Bad(
        "--image_encoder {d}/huge_header.safetensors", ("--image_encoder", "huge_header")
    ),
    "lora is a text file": Bad("--lora_weight {d}/notes.txt", ("--lora_weight", "notes.txt")),
    "lora truncated": Bad("--lora_weight {d}/lora_truncated.safetensors", ("--lora_weight", "truncated")),
    "lora is a VAE": Bad("--lora_weight {vae_file}", ("--lora_weight",)),
    "lora of another DiT": Bad("--lora_weight {d}/lora_other_dit.safetensors", ("--lora_weight", "lora_other_dit")),
    "latent_path is a text file": Bad("--latent_path {d}/notes.txt", ("--latent_path", "notes.txt")),
    "latent_path truncated": Bad("--latent_path {d}/latent_truncated.safetensors", ("--latent_path", "truncated")),
    "extend_video is a text file": Bad("--extend_video {d}/notes.mp4", ("--extend_video", "notes.mp4")),
    "from_metadata is a text file": Bad("--from_metadata {d}/notes.txt", ("--from_metadata", "notes.txt")),
    "image_path is a text file": Bad("--image_path {d}/notes.png", ("--image_path", "notes.png")),
    "end_image_path is a text file": Bad("--end_image_path {d}/notes.png", ("--end_image_path", "notes.png")),
    # outputs and device
    "save_path is a file": Bad("--save_path {d}/a_file", ("--save_path", "a_file")),
    "save_path under a file": Bad("--save_path {d}/a_file/out", ("--save_path", "a_file")),
    "device without CUDA": Bad("--device cuda:99", ("--device", "cuda:99")),
    "device unknown": Bad("--device gpu0", ("--device", "gpu0")),
    # numbers
    "seed too large": Bad("--seed 99999999999999999999999", ("--seed",)),
    "seed negative": Bad("--seed -3", ("--seed",)),
    "seeds too large": Bad("--seeds 1,99999999999999999999999", ("--seeds",)),
    "guidance_scale nan": Bad("--guidance_scale nan", ("--guidance_scale", "nan")),
    "embedded_cfg_scale inf": Bad("--embedded_cfg_scale inf", ("--embedded_cfg_scale", "inf")),
    "guidance_rescale nan": Bad("--guidance_rescale nan", ("--guidance_rescale",)),
    "lora_multiplier nan": Bad("--lora_weight {d}/lora.safetensors --lora_multiplier nan", ("--lora_multiplier",)),
    "one huge padding": Bad("--latent_paddings 100000000", ("--latent_paddings", "100000000")),
    "ten paddings, one huge": Bad("--latent_paddings 1,0,1,1000000,0,0,0,0,0,0", ("--latent_paddings", "1000000")),
    "padding not a number": Bad("--latent_paddings 1,x", ("--latent_paddings", "x")),
    # one-frame inputs
    "control_index beyond the control images": Bad(
        "--one_frame_inference target_index=1,control_index=0;5;9 --control_image_path {d}/control.png",
        ("control_index", "--control_image_path"),
    ),
    "more masks than control images": Bad(
        "--one_frame_inference target_index=1 --control_image_path {d}/control.png "
        "--control_image_mask_path {d}/mask.png {d}/mask.png",
        ("--control_image_mask_path",),
    ),
    "masks without control images": Bad(
        "--one_frame_inference target_index=1 --control_image_mask_path {d}/mask.png", ("--control_image_mask_path",)
    ),
    "negative target_index": Bad("--one_frame_inference target_index=-5", ("target_index",)),
    # LoRA patterns
    "include_patterns bad regex": Bad(
        "--lora_weight {d}/lora.safetensors --include_patterns ([", ("--include_patterns",)
    ),
    "exclude_patterns bad regex": Bad(
        "--lora_weight {d}/lora.safetensors --exclude_patterns *x", ("--exclude_patterns",)
    ),
    # prompt files
    "prompt file of comments only": Bad("--from_file {d}/comments.txt", ("--from_file", "comments.txt")),
    "prompt file with bad lines": Bad(
        "--from_file {d}/bad_lines.txt", ("bad_lines.txt", "line 2", "line 3", "line 4", "line 5: --vs: 100000000 sec")
    ),
    # video lengths beyond this machine's memory (a typo): refused before anything is allocated
    "video_sections beyond memory": Bad(
        "--video_sections 100000000", ("--video_sections", "GiB", "shorter or smaller video")
    ),
    "video_seconds beyond memory": Bad("--video_seconds 1e9", ("--video_seconds", "GiB")),
    "one frame beyond memory": Bad(
        "--one_frame_inference target_index=1 --video_size 160000 160000",
        ("--video_size", "one frame of 160000x160000"),
    ),
    "latent_window_size too large": Bad("--latent_window_size 100000", ("--latent_window_size 100000", "from 1 to 33")),
    "infer_steps beyond the timesteps": Bad("--infer_steps 1000000000", ("--infer_steps", "at most 1000")),
    "n_seeds huge": Bad("--n_seeds 100000000000000000000", ("--n_seeds", "at most 1,000,000")),
    "latent output beyond memory": Bad(
        "--video_sections 1000000000 --output_type latent", ("--video_sections", "as float32 latents")
    ),
}


def bad_argv(models, bad_files, out, case: Bad) -> list[str]:
    fields = {"d": bad_files, "vae_file": next(Path(models.vae).rglob("*.safetensors"))}
    fields |= {name: getattr(models, name) for name in ("dit", "vae", "text_encoder1", "text_encoder2")}
    extra = shlex.split(case.flags.format(**fields))
    base = [
        *models.flags(), "--image_path", str(bad_files / "start.png"), "--prompt", "a red box",
        "--video_size", "32", "48", "--latent_window_size", "3", "--infer_steps", "1", "--video_sections", "2",
        "--save_path", str(out), "--device", "cpu",
    ]  # fmt: skip
    if "--video_seconds" in extra:
        base.remove("--video_sections"), base.remove("2")
    if "--from_file" in extra or "--latent_path" in extra:
        base.remove("--prompt"), base.remove("a red box")
    return [sys.executable, "fpack_generate_video.py", *base, *extra]


@pytest.fixture(scope="module")
def bad_runs(models, bad_files, tmp_path_factory):
    """Every case of BAD run as its own process, three at a time: case -> (CompletedProcess, output folder)."""
    root = tmp_path_factory.mktemp("outputs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("FPACK_DEBUG", None)

    def run(item):
        name, case = item
        out = root / re.sub(r"\W+", "_", name)
        cmd = bad_argv(models, bad_files, out, case)
        return name, (subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300), out)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, BAD.items()))


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_error_line_before_any_model_loads_and_writes_nothing(models, bad_files, bad_runs, name):
    case, (result, out) = BAD[name], bad_runs[name]
    fields = {"d": bad_files} | {n: getattr(models, n) for n in ("dit", "vae", "text_encoder1", "text_encoder2")}
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    for word in case.names:
        assert word.format(**fields) in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    if case.before_loading:
        assert not LOADING.search(result.stderr), result.stderr[-3000:]
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []
    assert leftovers == []


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------


def generation(models, bad_files, out, *extra) -> list[str]:
    return [
        sys.executable, "fpack_generate_video.py", *models.flags(), "--video_size", "32", "48",
        "--latent_window_size", "3", "--video_sections", "1", "--save_path", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("phase, pattern", [("loading", r"Loading text encoder 1"), ("sampling", r"section 1/1")])
def test_ctrl_c_stops_at_once_with_one_line_and_leaves_no_output(models, bad_files, tmp_path, phase, pattern):
    out = tmp_path / "out"
    cmd = generation(models, bad_files, out, "--image_path", str(bad_files / "start.png"), "--prompt", "a red box",
                     "--infer_steps", "400", "--output_type", "both")  # fmt: skip
    assert_interrupted(*interrupt_when(cmd, pattern))
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_ctrl_c_in_a_prompt_file_keeps_the_finished_lines_and_drops_the_interrupted_one(models, bad_files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    start = bad_files / "start.png"
    prompts.write_text(f"first --i {start} --d 1 --s 1\nsecond --i {start} --d 2 --s 400\n")
    out = tmp_path / "out"
    cmd = generation(models, bad_files, out, "--from_file", str(prompts), "--output_type", "latent_images")
    code, stderr, seconds = interrupt_when(cmd, r"prompt 2/2")
    assert_interrupted(code, stderr, seconds)
    latents = sorted(out.glob("*.safetensors"))
    assert [load_latent(str(p))[1]["prompt"] for p in latents] == ["first"]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert folder.name.endswith("_1_") and len(list(folder.glob("*.png"))) == 13  # 4·3 + 1 frames of line 1
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# the output being saved -> (os.replace call held up: its temporary name, the name of that temporary file)
SAVES = {
    "latent": (r"_latent\.safetensors\.tmp\d+',", "*_latent.safetensors.tmp*"),
    "video": (r"\.tmp\d+\.mp4',", "*.tmp*.mp4"),
}


@pytest.mark.parametrize("saving", SAVES)
def test_ctrl_c_while_saving_removes_the_half_written_output_and_keeps_finished_ones(
    models, bad_files, tmp_path, saving
):
    """Held up just before the rename of the output's temporary file (complete on disk, not yet in place); with
    --output_type both the latent is saved first, then the video is decoded and saved."""
    held, temporary = SAVES[saving]
    out = tmp_path / "out"
    cmd = generation(models, bad_files, out, "--image_path", str(bad_files / "start.png"), "--prompt", "a red box",
                     "--infer_steps", "1", "--output_type", "both")  # fmt: skip
    seen = {}

    def look() -> None:
        seen.update(temporary=list(out.glob(temporary)), files=files_under(out))

    code, stderr, seconds = interrupt_when(held_up(cmd, "os:replace", match=held), PAUSED, at_signal=look)
    assert_interrupted(code, stderr, seconds)
    assert len(seen["temporary"]) == 1, seen  # the signal came during that save
    finished = [name for name in seen["files"] if ".tmp" not in name]
    assert files_under(out) == finished  # the half-written output is gone, what was finished stays
    if saving == "latent":
        assert finished == []
    else:
        (latent,) = finished
        assert latent.endswith("_latent.safetensors") and load_latent(str(out / latent))[1]["prompt"] == "a red box"


def test_a_second_ctrl_c_while_the_first_is_reported_still_ends_with_one_line(models, bad_files, tmp_path):
    """`accelerate launch` forwards the terminal's SIGINT to processes that got it already: the second one lands
    while the first is being reported (held up there), and the script still ends as for one."""
    out = tmp_path / "out"
    cmd = generation(models, bad_files, out, "--image_path", str(bad_files / "start.png"), "--prompt", "a red box",
                     "--infer_steps", "400", "--output_type", "latent")  # fmt: skip
    code, stderr, seconds = interrupt_when(held_up(cmd, "utils.cli:report_interrupted"), r"section 1/1", again=PAUSED)
    assert PAUSED in stderr
    assert_interrupted(code, stderr, seconds)
    assert files_under(out) == []


def test_a_swallowed_ctrl_c_still_ends_the_script_within_the_grace(tmp_path):
    """A KeyboardInterrupt dropped by a library (here: caught and ignored) is ended by the watchdog; its cleanups
    run first."""
    leftover = tmp_path / "half.tmp"
    program = (
        "import sys, time\n"
        "from utils.cli import on_forced_interrupt, script_main\n"
        "def main():\n"
        f"    open({str(leftover)!r}, 'w').close()\n"
        f"    on_forced_interrupt(lambda: __import__('os').remove({str(leftover)!r}))\n"
        "    announced = False\n"
        "    while True:\n"
        "        try:\n"
        "            if not announced:\n"
        "                announced = True\n"
        "                print('working', file=sys.stderr, flush=True)\n"
        "            time.sleep(0.01)\n"
        "        except KeyboardInterrupt:\n"
        "            pass\n"
        "script_main(main, interrupt_grace_s=1.0)()\n"
    )
    code, stderr, seconds = interrupt_when([sys.executable, "-c", program], "working", {"PYTHONPATH": ROOT})
    assert_interrupted(code, stderr, seconds)
    assert seconds >= 1.0 and not leftover.exists()


# ---- checks that need the run's context, in process ----------------------------------------------------------------


def test_paddings_beyond_the_sections_are_warned_about_and_bounded_by_the_section_count(caplog):
    from pipelines.generate_args import check_latent_paddings
    from pipelines.settings import GenerationSettings

    two = GenerationSettings(video_sections=2, latent_paddings="1,0,1,2,0,0,0,0,0,0")
    with caplog.at_level("WARNING"):
        check_latent_paddings(two)
    assert "10 values for 2 section(s); using the first 2 (1,0)" in caplog.text
    check_latent_paddings(GenerationSettings(video_sections=9, latent_paddings="8,0"))  # max(3, 9 - 1) = 8
    for settings in (GenerationSettings(video_sections=9, latent_paddings="9"),
                     GenerationSettings(video_sections=2, latent_paddings="4")):  # fmt: skip
        with pytest.raises(UsageError, match="too large"):
            check_latent_paddings(settings)
    check_latent_paddings(GenerationSettings(video_sections=2, latent_paddings="100000000", f1=True))  # unused in F1


def test_control_index_and_masks_are_checked_against_the_control_images():
    from pipelines.generate_args import check_control_images, line_flag
    from pipelines.settings import GenerationSettings

    one = ("c.png",)
    check_control_images(GenerationSettings(one_frame_inference="control_index=0;10", control_image_path=one))
    check_control_images(GenerationSettings(one_frame_inference="control_index=0;5,no_post",
                                            control_image_path=("a.png", "b.png"),
                                            control_image_mask_path=("m.png",)))  # fmt: skip
    with pytest.raises(UsageError, match="3 indices for 2 clean latent"):
        check_control_images(GenerationSettings(one_frame_inference="control_index=0;1;2", control_image_path=one))
    with pytest.raises(UsageError, match="2 indices for 1 clean latent"):
        check_control_images(
            GenerationSettings(one_frame_inference="control_index=0;1,no_post", control_image_path=one)
        )
    with pytest.raises(UsageError, match=r"^--cim: masks given without control images \(--ci\)"):
        check_control_images(GenerationSettings(control_image_mask_path=("m.png",)), line_flag)


def test_seeds_must_fit_the_generator():
    from pipelines.generate_args import check_seeds, line_flag
    from pipelines.settings import GenerationSettings

    check_seeds(GenerationSettings(seed=2**64 - 1))
    check_seeds(GenerationSettings(seed=0, n_seeds=3))
    for settings, flag in ((GenerationSettings(seed=2**64), "--d"), (GenerationSettings(seed=-1), "--d"),
                           (GenerationSettings(seeds=(1, 2**70)), "--seeds"),
                           (GenerationSettings(seed=2**64 - 2, n_seeds=3), "--n_seeds")):  # fmt: skip
        with pytest.raises(UsageError, match=f"^{flag} "):
            check_seeds(settings, line_flag)


@pytest.mark.parametrize("line, message", [("--d 14 a cat", "starts with the option --d"),
                                           ("a cat --g nan", "--g nan: must be a finite number"),
                                           ("a cat --d -2", "--d -2: a seed is an integer")])  # fmt: skip
def test_prompt_lines_are_refused_with_what_is_wrong(tmp_path, line, message):
    from pipelines.generate_args import apply_prompt_line, parse_prompt_line
    from pipelines.prompt_line import PromptLineError
    from pipelines.settings import GenerationSettings

    with pytest.raises(PromptLineError) as err:
        apply_prompt_line(GenerationSettings(), parse_prompt_line(line))
    assert message in str(err.value)


def test_a_video_is_refused_exactly_when_its_frames_exceed_the_machines_memory(monkeypatch):
    """2 sections of 3 latent frames: 1 + 2·3 latents -> 25 frames of 48x32, 3 values each in 16 bits = 230400
    bytes decoded; as latents 7 · 16 · 4·6 float32 values = 10752 bytes."""
    import pipelines.generate_args as GA
    from pipelines.settings import GenerationSettings

    decoded = GenerationSettings(video_size=(32, 48), latent_window_size=3, video_sections=2)
    latent = decoded.replace(output_type="latent")
    for settings, needed in ((decoded, 25 * 3 * 32 * 48 * 2), (latent, 7 * 16 * 4 * 6 * 4)):
        monkeypatch.setattr(GA, "system_memory_bytes", lambda needed=needed: needed)
        GA.check_video_length(settings)
        monkeypatch.setattr(GA, "system_memory_bytes", lambda needed=needed: needed - 1)
        with pytest.raises(UsageError, match=r"^--video_sections: 2 sections \(25 frames of 48x32\)"):
            GA.check_video_length(settings)
    one_frame = decoded.replace(one_frame_inference="target_index=1")
    monkeypatch.setattr(GA, "system_memory_bytes", lambda: 3 * 32 * 48 * 2)
    GA.check_video_length(one_frame)  # one frame: the section count does not matter
    with pytest.raises(UsageError, match=r"^--video_size: one frame of 64x32"):
        GA.check_video_length(one_frame.replace(video_size=(32, 64)))


@pytest.mark.parametrize(
    "flags, warning",
    [
        ("--f1 --end_image_path e.png", "--end_image_path is ignored with --f1"),
        ("--one_frame_inference target_index=1 --end_image_path e.png", "--end_image_path is ignored with --one_frame"),
        ("--f1 --latent_paddings 0,0", "--latent_paddings is ignored with --f1"),
        ("--lora_multiplier 1 2", "--lora_multiplier is ignored: no --lora_weight"),
        ("--lora_multiplier 1 2 --from_file p.txt", None),  # the lines may give LoRAs
        ("--end_image_path e.png", None),
    ],
)
def test_flags_the_run_will_not_use_are_warned_about(caplog, flags, warning):
    import shlex

    from pipelines.generate_args import build_parser, warn_unused_flags

    with caplog.at_level("WARNING", logger="pipelines.generate_args"):
        warn_unused_flags(build_parser().parse_args(["--save_path", "out", *shlex.split(flags)]))
    messages = [record.getMessage() for record in caplog.records]
    if warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warning in messages[0], messages


def test_the_next_generation_removes_what_a_killed_one_was_writing(tmp_path):
    """Only the temporary files of processes that no longer run go; a live process's and the user's files stay."""
    from pipelines.preflight import prepare_save_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "killed": f"20261201-120000_1.tmp{dead.pid}.mp4",
        "killed_latent": f"20261201-120000_1.safetensors.tmp{dead.pid}",
        "running": f"20261201-120001_2.tmp{os.getpid()}.mp4",
        "users": "notes.tmp.txt",
        "finished": "20261201-115959_3.mp4",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    prepare_save_path(str(tmp_path))
    kept = {"running", "users", "finished"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in kept)
