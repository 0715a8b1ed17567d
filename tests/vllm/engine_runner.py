"""One vLLM-CPU engine with the kvstore connector, driven over stdin/stdout (JSON lines).

Runs in the vLLM virtual environment (``.venv-vllm``), never in the test process: the tests
(and bench/vllm_ttft.py) start it with :class:`vllm_harness.Engine`, which keeps it alive
across several requests so the 30-40 s engine start is paid once per engine.

Argv: ``engine_runner.py <hf model dir> <kv_transfer_config JSON or "none">``.
Commands: ``{"op": "generate", "prompts": [[ids...], ...], "max_tokens": n,
"kv_params": {...}}`` -> ``{"results": [{"tokens", "ttft_s", "wall_s", "num_cached_tokens",
"kv_transfer_params"}]}``; ``{"op": "quit"}``. Prompts run one at a time (TTFT of each alone).
Replies are the lines starting with ``@@RESULT `` (vLLM logs to the same streams).
"""

from __future__ import annotations

import json
import os
import sys
import time

REPLY = "@@RESULT "


def main() -> None:
    model_dir, kv_cfg = sys.argv[1], sys.argv[2]
    # Replies keep the original stdout; everything vLLM prints goes to stderr (the log file),
    # so a chatty engine can never fill the reply pipe while nobody reads it.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import logging

    kv_log = logging.getLogger("kvstore_client")      # the connector's per-load lines, in the log file
    kv_log.setLevel(logging.INFO)
    kv_log.addHandler(logging.StreamHandler(sys.stderr))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=model_dir, dtype="float32", max_model_len=8192, enable_prefix_caching=False,
                  disable_log_stats=False, seed=0, enforce_eager=True)
    if kv_cfg != "none":
        kwargs["kv_transfer_config"] = json.loads(kv_cfg)
    llm = LLM(**kwargs)
    print(REPLY + json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        results = []
        for ids in cmd["prompts"]:
            extra = {"kv_transfer_params": cmd["kv_params"]} if cmd.get("kv_params") else None
            sp = SamplingParams(temperature=0.0, max_tokens=cmd.get("max_tokens", 16), ignore_eos=True,
                                extra_args=extra)
            t0 = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
            wall = time.perf_counter() - t0
            m = out.metrics
            results.append({"tokens": list(out.outputs[0].token_ids), "wall_s": wall,
                            "ttft_s": getattr(m, "first_token_latency", None) if m is not None else None,
                            "num_cached_tokens": out.num_cached_tokens,
                            "kv_transfer_params": out.kv_transfer_params})
        print(REPLY + json.dumps({"results": results}), file=replies, flush=True)


if __name__ == "__main__":
    main()
