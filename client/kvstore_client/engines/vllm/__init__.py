"""vLLM V1 KV connector for the kvstore sidecar (docs/vllm.md).

``kv_connector="KVStoreConnector"``, ``kv_connector_module_path="kvstore_client.engines.vllm"``.
Importing this package imports vLLM.
"""

from .connector import KVStoreConnector

__all__ = ["KVStoreConnector"]
