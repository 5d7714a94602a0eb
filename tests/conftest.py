from __future__ import annotations

import pytest

from qavtp.data.easyvqa import load_easyvqa
from qavtp.data.prompts import SHORT_ANSWER
from qavtp.models.random_llava import make_random_llava, small_tokenizer


@pytest.fixture(scope="session")
def easyvqa_test():
    return load_easyvqa("test")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, easyvqa_test):
    corpus = list(easyvqa_test["question"][:2000]) + [SHORT_ANSWER, "user assistant"] * 20
    corpus += ["circle rectangle triangle red green blue black gray teal brown yellow yes no"] * 20
    tok = small_tokenizer(corpus, vocab_size=400)
    return make_random_llava(tmp_path_factory.mktemp("tiny") / "llava", tok)
