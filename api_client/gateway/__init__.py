"""The OpenAI-compatible HTTP gateway over the job queue: `python -m api_client.gateway`.

Stateless (every job and result lives in Redis), so any number of replicas can serve one queue, and
no torch: it needs fastapi, uvicorn, pydantic-settings and prometheus-client (`tokenrelay[gateway]`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api_client.gateway.app import create_app
    from api_client.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so that api_client.batches (Client.submit_batch) can use the request models without FastAPI.
    if name == "create_app":
        from api_client.gateway.app import create_app

        return create_app
    if name == "GatewaySettings":
        from api_client.gateway.settings import GatewaySettings

        return GatewaySettings
    raise AttributeError(name)
