"""The tokenizer of a GGUF file built without torch (models/gguf.py load_tokenizer) against
transformers' AutoTokenizer(gguf_file=...), which reads the file through torch; damaged files."""

import os
import re
from pathlib import Path

import pytest

from lqae_vlap import models
from lqae_vlap.models import gguf as gguf_lib
from tests.helpers import smollm2_dir

TEXTS = ["A picture of", "a handwritten digit seven", "Question: What digit is this? Answer:",
         "Hello<|im_end|> world\n\n  x", "  leading spaces, ünïcödé and 数字 7", ""]


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    (path,) = sorted(Path(smollm2_dir()).glob("*.gguf"))
    return path


@pytest.fixture(scope="module")
def both(smollm2_gguf):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return models.load_tokenizer(smollm2_gguf), reference


def test_same_ids_as_transformers(both):
    ours, reference = both
    for text in TEXTS:
        for special in (True, False):
            assert (ours(text, add_special_tokens=special)["input_ids"]
                    == reference(text, add_special_tokens=special)["input_ids"]), text
    assert len(ours) == len(reference) == 49152


def test_same_special_tokens_and_decoding(both):
    ours, reference = both
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.eos_token_id == 2 and ours.bos_token_id == 1  # SmolLM2's <|im_end|>, <|im_start|>
    ids = reference("a handwritten digit seven<|im_end|>", add_special_tokens=False)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
            ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=True) == "a handwritten digit seven"


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_damaged_gguf_is_named(smollm2_gguf, tmp_path, how):
    data = smollm2_gguf.read_bytes()[:1 << 20]  # the first MiB: the header and the vocabulary
    data = {"truncated": data[:len(data) // 3], "garbage": os.urandom(1 << 16),
            "empty": b""}[how]
    bad = tmp_path / "model.gguf"
    bad.write_bytes(data)
    expected = re.escape(str(bad)) + r" cannot be read as a GGUF file \(.*\); it is truncated or " \
        "damaged: re-download it"
    with pytest.raises(ValueError, match=expected):
        gguf_lib.load_tokenizer(bad)
    with pytest.raises(ValueError, match=expected):
        gguf_lib.open_gguf(bad)
