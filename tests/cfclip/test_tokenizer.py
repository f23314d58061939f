"""cfdeploy's torch-free tokenizer against open_clip's, prompt by prompt."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest

from cfdeploy.errors import CfdeployError
from cfdeploy.tokenizer import ClipTokenizer
from conftest import TOKENIZER_PROMPTS


@pytest.fixture(scope="module")
def tokenizers():
    return ClipTokenizer(), open_clip.get_tokenizer("ViT-B-32")


@pytest.mark.parametrize("prompt", TOKENIZER_PROMPTS)
def test_token_ids_equal_open_clip(tokenizers, prompt):
    ours, theirs = tokenizers
    assert np.array_equal(ours([prompt]), theirs([prompt]).numpy())


def test_a_batch_is_int64_ids_of_77_tokens_with_start_and_end(tokenizers):
    tokens = tokenizers[0](TOKENIZER_PROMPTS[:3])
    assert tokens.shape == (3, 77) and tokens.dtype == np.int64
    assert tokens[0, 0] == 49406 and 49407 in tokens[0]


def test_overlong_prompt_is_refused_not_truncated(tokenizers):
    with pytest.raises(CfdeployError, match="is 78 tokens; CLIP reads at most 77"):
        tokenizers[0](["word " * 76])
