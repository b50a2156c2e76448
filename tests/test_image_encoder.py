"""SigLIP image encoder: config from shapes, fixed preprocessing, last_hidden_state, real sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hunyuan_model.image_encoder import encode_image, load_image_encoder, preprocess_image, siglip_config_from_shapes
from tests.factory import dims
from tests.factory.image_encoder import make_image_encoder_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_image_encoder_files(tmp_path_factory.mktemp("image_encoder"))


@pytest.fixture(scope="module")
def encoder(files):
    return load_image_encoder(files.comfy)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)


def test_config_from_shapes(encoder):
    c = encoder.config
    assert dims.config_sizes(c) == (dims.SIGLIP_HIDDEN, dims.SIGLIP_LAYERS, dims.SIGLIP_INTERMEDIATE)
    assert (c.num_attention_heads, c.image_size, c.patch_size) == (1, 384, 14)
    assert (c.hidden_act, c.layer_norm_eps, c.vision_use_head) == ("gelu_pytorch_tanh", 1e-6, True)


def test_last_hidden_state_shape(encoder, image):
    out = encode_image(image, encoder)
    assert out.shape == (1, 729, dims.SIGLIP_HIDDEN) and out.dtype == torch.float16
    assert torch.isfinite(out).all()
    with torch.no_grad():
        direct = encoder(pixel_values=preprocess_image(image).half()).last_hidden_state
    torch.testing.assert_close(out, direct)


def test_file_without_pooling_head_gives_the_same_features(files, encoder, image):
    headless = load_image_encoder(files.headless)
    assert not headless.config.vision_use_head
    torch.testing.assert_close(encode_image(image, headless), encode_image(image, encoder))


def test_preprocessing_range_and_reference_processor(image):
    x = preprocess_image(image)
    assert x.shape == (1, 3, 384, 384) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert bool((preprocess_image(np.zeros((8, 8, 3), np.uint8)) == -1).all())
    assert bool((preprocess_image(np.full((8, 8, 3), 255, np.uint8)) == 1).all())
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(
        do_resize=True,
        size={"height": 384, "width": 384},
        resample=3,
        do_rescale=True,
        rescale_factor=0.00392156862745098,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    torch.testing.assert_close(x, processor.preprocess(images=image, return_tensors="pt")["pixel_values"])


def test_preprocessing_refuses_non_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((8, 8, 4), np.uint8))


def test_real_siglip_shapes_give_the_reference_model():
    """so400m-patch14-384 as in the FLUX.1 Redux image encoder: 448 tensors, 428,225,600 parameters with the head."""
    from accelerate import init_empty_weights
    from transformers import SiglipVisionModel

    h, inter = 1152, 4304
    shapes = {
        "embeddings.patch_embedding.weight": (h, 3, 14, 14),
        "embeddings.position_embedding.weight": (729, h),
        "head.probe": (1, 1, h),
    }
    shapes.update({f"encoder.layers.{n}.mlp.fc1.weight": (inter, h) for n in range(27)})
    c = siglip_config_from_shapes(shapes)
    assert (c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.image_size) == (27, 16, inter, 384)
    with init_empty_weights():
        state = SiglipVisionModel(c).state_dict()
    assert len(state) == 448
    assert sum(t.numel() for t in state.values()) == 428_225_600
