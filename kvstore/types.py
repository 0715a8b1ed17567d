"""Compatibility re-export: the domain types live in ``kvstore.domain.types``."""

from .domain.types import *  # noqa: F401,F403
from .domain.types import CHUNK_ID_BYTES, __all__  # noqa: F401
