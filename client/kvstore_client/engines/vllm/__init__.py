"""vLLM V1 KV connector for the kvstore sidecar (docs/vllm.md).

``kv_connector="KVStoreConnector"``, ``kv_connector_module_path="kvstore_client.engines.vllm"``.
The connector class imports vLLM when first accessed; the helpers (``layout``, ``config``,
``namespace``) import only torch, so tools and benchmarks can use them without vLLM.
"""

__all__ = ["KVStoreConnector"]


def __getattr__(name: str):
    if name == "KVStoreConnector":
        from .connector import KVStoreConnector

        return KVStoreConnector
    raise AttributeError(name)
