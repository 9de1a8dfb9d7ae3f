"""The HTTP frontend (FastAPI, asyncio): OpenAI API, SSE, health and metrics.

Sits at the top of the flow in docs/ARCHITECTURE.md §1: it validates requests, turns them into
``engine.request.EngineRequest`` objects for ``engine.client.AsyncEngine`` and formats what comes
back. It never imports torch.
"""


def package_version() -> str:
    """The installed ``layerskip-serve`` distribution's version (its metadata, from
    ``pyproject.toml``); ``"unknown"`` when the code runs uninstalled."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("layerskip-serve")
    except PackageNotFoundError:
        return "unknown"
