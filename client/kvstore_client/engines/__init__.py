"""Engine adapters: connect an inference engine's KV cache to the kvstore daemon.

- :mod:`.transformers`: Hugging Face transformers causal LMs (``DynamicCache``).
- :mod:`.smollm2`: loader for the SmolLM2-135M-Instruct GGUF the demo, tests and bench use.

Adapters import their engine lazily; importing this package needs nothing beyond the client.
"""

from ._base import PrefixStore, StoreQueue

__all__ = ["PrefixStore", "StoreQueue"]
