"""One-frame inference (1f edit, kisekaeichi, 1f-mc): what is fed to the DiT, and every option combination."""

import copy
import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import generate as G
from pipelines.generate_args import build_parser
from pipelines.models import ModelCache
from pipelines.settings import GenerationSettings, ModelSettings
from tests.factory.models import write_all_models
from tests.test_generate import count_dit_calls

H, W = 32, 48
LWS = 9


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_frame")
    models = write_all_models(root / "models")
    start = np.zeros((H, W, 3), np.uint8)
    start[:, : W // 2] = (220, 30, 30)
    reference = np.zeros((H, W, 4), np.uint8)
    reference[..., :3] = (30, 30, 220)
    reference[..., 3] = 0
    reference[:, W // 2 :, 3] = 255  # alpha keeps the right half
    mask = np.zeros((H, W), np.uint8)
    mask[: H // 2] = 255  # keeps the top half
    paths = {"start": root / "start.png", "reference": root / "reference.png", "mask": root / "mask.png"}
    Image.fromarray(start).save(paths["start"])
    Image.fromarray(reference, "RGBA").save(paths["reference"])
    Image.fromarray(mask, "L").save(paths["mask"])
    return models, {k: str(v) for k, v in paths.items()}, root


def make_args(models, paths, out, *extra):
    argv = [*models.flags(), "--image_path", paths["start"], "--prompt", "The girl in a school blazer.",
            "--video_size", str(H), str(W), "--infer_steps", "1", "--seed", "1234", "--save_path", str(out),
            *extra]  # fmt: skip
    args = build_parser().parse_args(argv)
    return GenerationSettings.from_args(args), ModelSettings.from_args(args)


def one_call(models, paths, out, monkeypatch, *extra):
    calls = count_dit_calls(monkeypatch)
    settings, model_settings = make_args(models, paths, out, "--output_type", "latent_images", *extra)
    cpu = torch.device("cpu")
    assert G.run_one(settings, ModelCache(model_settings, cpu, keep=False), cpu)
    assert len(calls) == 1
    return calls[0]


def latent_hw():
    return H // 8, W // 8


def test_basic_edit_feeds_control_post_2x_and_4x(setup, tmp_path, monkeypatch):
    models, paths, _ = setup
    kw = one_call(models, paths, tmp_path, monkeypatch, "--control_image_path", paths["start"],
                  "--one_frame_inference", "target_index=9")  # fmt: skip
    h, w = latent_hw()
    assert kw["hidden_states"].shape == (1, 16, 1, h, w)
    assert kw["latent_indices"].tolist() == [[9]]
    assert kw["clean_latent_indices"].tolist() == [[0, 1 + LWS]]
    assert kw["clean_latents"].shape == (1, 16, 2, h, w)
    assert kw["clean_latents"][:, :, 1].abs().sum() == 0  # the zero "post" latent
    assert kw["clean_latents"][:, :, 0].abs().sum() > 0
    assert kw["clean_latent_2x_indices"].tolist() == [[LWS + 2, LWS + 3]]
    assert kw["clean_latent_4x_indices"].tolist() == [list(range(LWS + 4, LWS + 20))]
    assert kw["clean_latents_2x"].shape == (1, 16, 2, h, w) and kw["clean_latents_2x"].abs().sum() == 0
    assert kw["clean_latents_4x"].shape == (1, 16, 16, h, w) and kw["clean_latents_4x"].abs().sum() == 0
    pngs = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
    assert len(pngs) == 1  # one image, saved directly in --save_path
    assert len([f for f in os.listdir(tmp_path) if f.endswith("_latent.safetensors")]) == 1


def lanczos_mask(path_or_array) -> torch.Tensor:
    """Independent mask rule: grayscale, LANCZOS straight to latent size, / 255."""
    h, w = latent_hw()
    image = Image.open(path_or_array) if isinstance(path_or_array, str) else Image.fromarray(path_or_array)
    return torch.from_numpy(np.asarray(image.convert("L").resize((w, h), Image.LANCZOS), dtype=np.float32) / 255)


def test_kisekaeichi_masks_and_indices(setup, tmp_path, monkeypatch):
    models, paths, root = setup
    white = root / "white.png"
    Image.fromarray(np.full((H, W), 255, np.uint8), "L").save(white)
    options = "target_index=1,control_index=0;10,no_post,no_2x,no_4x"
    controls = ["--control_image_path", paths["start"], paths["reference"]]
    raw = one_call(models, paths, tmp_path / "raw", monkeypatch, *controls, "--one_frame_inference", options,
                   "--control_image_mask_path", str(white), str(white))  # fmt: skip
    masked = one_call(models, paths, tmp_path / "masked", monkeypatch, *controls, "--one_frame_inference", options,
                      "--control_image_mask_path", paths["mask"])  # fmt: skip
    assert masked["latent_indices"].tolist() == [[1]]
    assert masked["clean_latent_indices"].tolist() == [[0, 10]]
    assert masked["clean_latents_2x"] is None and masked["clean_latents_4x"] is None
    assert masked["clean_latent_2x_indices"] is None and masked["clean_latent_4x_indices"] is None
    # control 0 is masked by the mask file; control 1 has no mask file, so its alpha channel masks it
    alpha = np.asarray(Image.open(paths["reference"]))[..., 3]
    expected_0 = raw["clean_latents"][:, :, 0] * lanczos_mask(paths["mask"])
    expected_1 = raw["clean_latents"][:, :, 1] * lanczos_mask(alpha)
    assert torch.allclose(masked["clean_latents"][:, :, 0], expected_0, atol=1e-6)
    assert torch.allclose(masked["clean_latents"][:, :, 1], expected_1, atol=1e-6)
    for i in (0, 1):  # the masks really remove most of the masked-out half
        kept, dropped = masked["clean_latents"][0, :, i].abs().sum(), raw["clean_latents"][0, :, i].abs().sum()
        assert kept < 0.7 * dropped


def test_1f_mc_layout(setup, tmp_path, monkeypatch):
    models, paths, _ = setup
    kw = one_call(models, paths, tmp_path, monkeypatch, "--control_image_path", paths["start"], paths["reference"],
                  "--one_frame_inference", "control_index=0;1,target_index=9,no_2x,no_4x")  # fmt: skip
    assert kw["latent_indices"].tolist() == [[9]]
    assert kw["clean_latent_indices"].tolist() == [[0, 1, 1 + LWS]]
    assert kw["clean_latents"].shape[2] == 3


def test_every_option_combination_runs_with_and_without_masks(setup, tmp_path):
    models, paths, _ = setup
    base, model_settings = make_args(models, paths, tmp_path, "--control_image_path", paths["start"],
                                     paths["reference"], "--control_image_mask_path", paths["mask"],
                                     "--one_frame_inference", "default")  # fmt: skip
    device = torch.device("cpu")
    m = ModelCache(model_settings, device, keep=True)
    dit = m.dit()
    with_masks = G.prepare_inputs(base, m, seed=5)
    without = copy.copy(with_masks)
    without.control_masks = [None, None]
    latents = {}
    for flags in itertools.product([False, True], repeat=3):
        tokens = [t for t, on in zip(("no_2x", "no_4x", "no_post"), flags) if on] or ["default"]
        args = base.replace(one_frame_inference=",".join(tokens))
        for inputs in (with_masks, without):
            latent = G.generate_latent(args, dit, inputs, 5, device)
            assert latent.shape == (1, 16, 1, H // 8, W // 8) and torch.isfinite(latent).all()
            latents[(tuple(tokens), inputs is with_masks)] = latent
    # every option and the masks reach the model: no two of the 16 runs give the same frame
    same = [(a, b) for a, b in itertools.combinations(latents, 2) if torch.equal(latents[a], latents[b])]
    assert not same


def test_one_frame_without_control_images_uses_a_zero_latent(setup, tmp_path, monkeypatch):
    models, paths, _ = setup
    kw = one_call(models, paths, tmp_path, monkeypatch, "--one_frame_inference", "no_2x,no_4x")
    assert kw["clean_latent_indices"].tolist() == [[0, 1 + LWS]]
    assert kw["clean_latents"].abs().sum() == 0


def test_bad_one_frame_option_is_refused(setup, tmp_path):
    models, paths, _ = setup
    with pytest.raises(SystemExit):
        G.main([*models.flags(), "--image_path", paths["start"], "--prompt", "p", "--save_path", str(tmp_path),
                "--one_frame_inference", "target_index=abc"])  # fmt: skip
    assert not os.listdir(tmp_path)
