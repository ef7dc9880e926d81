"""``sdfast serve``: Stable Diffusion as an HTTP service on Ray Serve, from one GPU to a cluster.

``requests`` (what a client may ask, the limits), ``options`` (how the application is set up) and ``batching``
(same-shape requests through one call) are plain Python; ``app`` holds the Ray Serve deployments and needs the
``serve`` extra (``pip install "sdfast[serve]"``). ``import sdfast`` never imports Ray.
"""

from importlib.util import find_spec

HAS_SERVE = all(find_spec(name) is not None for name in ("ray", "fastapi", "httpx"))


def require_serve() -> None:
    """A clear error, instead of an ImportError, when the serve extra is not installed."""
    if not HAS_SERVE:
        raise ValueError('sdfast serve needs Ray Serve, FastAPI and httpx: pip install "sdfast[serve]"')
