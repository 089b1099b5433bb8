"""The review page: a local, server-rendered web page over the store (Starlette + Jinja2, served
by uvicorn). It reads the store and makes every change through the same Python API as the CLI;
see app.py for the pages, security.py for what guards them and server.py for how it is served."""

from .app import create_app

__all__ = ["create_app"]
