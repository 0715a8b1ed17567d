"""Engine adapters: connect an inference engine's KV cache to the kvstore daemon.

- :mod:`.transformers`: Hugging Face transformers causal LMs (``DynamicCache``).

Adapters import their engine lazily; importing this package needs nothing beyond the client.
"""

from ._base import PrefixStore, StoreQueue

__all__ = ["PrefixStore", "StoreQueue"]
