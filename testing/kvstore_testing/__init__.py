"""Shared helpers of the tests, the benchmarks and the demo; never imported by the daemon or the client.

- :mod:`.ports`: ``free_port()``.
- :mod:`.daemon`: ONE real-daemon spawner (``spawn_daemon`` / ``DaemonProcess``).
- :mod:`.data`: namespaces, tokens and random KV of the integration tests.
- :mod:`.codec_data`: synthetic KV chunks and bitstream surgery for codec tests and benchmarks.
- :mod:`.smollm2`: the SmolLM2-135M-Instruct loader (offline GGUF) and real-KV extraction.
- :mod:`.hf_export`: the offline SmolLM2 GGUF -> Hugging Face directory export vLLM loads.
- :mod:`.redis_cluster`, :mod:`.throttle`: a real local Redis Cluster and a rate-limited proxy.
- :mod:`.demo`: the end-to-end prefix-reuse demo (``python -m kvstore_testing.demo``).

Modules import their heavy dependencies (torch, transformers, the client) lazily or only
where needed; importing this package needs nothing.
"""
