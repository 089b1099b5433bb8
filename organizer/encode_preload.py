"""Imported by the encoder pool's fork server only (encode._pool_context): loads the face models
there once, so that every worker forked from it starts with them loaded and shares their memory."""

from .encode import preload_models

preload_models()
