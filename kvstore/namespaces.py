"""Compatibility re-export: the namespace registry lives in ``kvstore.domain.namespaces``."""

from .domain.namespaces import *  # noqa: F401,F403
from .domain.namespaces import REGISTRY_FILE, NamespaceInfo, NamespaceRegistry, build_namespace  # noqa: F401
