from __future__ import annotations

import pytest

from qavtp.data.easyvqa import load_easyvqa
from qavtp.data.prompts import SHORT_ANSWER
from qavtp.models.loading import load_model
from qavtp.models.random_llava import make_random_llava, small_tokenizer
from qavtp.prompting import encode


@pytest.fixture(scope="session")
def easyvqa_test():
    return load_easyvqa("test")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, easyvqa_test):
    corpus = list(easyvqa_test["question"][:2000]) + [SHORT_ANSWER, "user assistant"] * 20
    corpus += ["circle rectangle triangle red green blue black gray teal brown yellow yes no"] * 20
    tok = small_tokenizer(corpus, vocab_size=400)
    return make_random_llava(tmp_path_factory.mktemp("tiny") / "llava", tok)


@pytest.fixture(scope="session")
def padded_rows(easyvqa_test):
    """Three questions of different lengths (images, prompts): a batch of them is left-padded."""
    rows = easyvqa_test[:3]
    texts = [rows["prompt"][0], rows["prompt"][1] + " Look at the whole picture carefully.", rows["prompt"][2]]
    return rows["image"], texts


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    """``(model, processor, adapter)`` of the tiny random LLaVA, fresh for each test module."""
    return load_model(tiny_llava_dir)


@pytest.fixture(scope="module")
def enc(tiny, padded_rows):
    return encode(tiny[1], *padded_rows)
