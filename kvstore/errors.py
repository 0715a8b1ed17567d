"""Compatibility re-export: the exception hierarchy lives in ``kvstore.domain.errors``."""

from .domain.errors import *  # noqa: F401,F403
