"""The OpenAI-compatible HTTP gateway over the job queue: `python -m api_client.gateway`.

Stateless (every job and result lives in Redis), so any number of replicas can serve one queue, and
no torch: it needs fastapi, uvicorn, pydantic-settings and prometheus-client (`tokenrelay[gateway]`)."""

from __future__ import annotations

from api_client.gateway.app import create_app
from api_client.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]
