"""Imported by the encoder pool's fork server only (encode._pool_context): loads the face models
there once, so that every worker forked from it starts with them loaded and shares their memory."""

import gc

from .encode import preload_models

preload_models()
# What is loaded now is never freed: keep the cycle collector of the workers off these objects, or
# each collection would write to (and so copy) pages the workers share
gc.freeze()
