"""`python -m api_client.gateway`: the gateway under uvicorn, configured from TOKENRELAY_* variables.

Exit codes: 0 on a clean stop (SIGTERM/SIGINT), 2 on bad configuration."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

GRACEFUL_SHUTDOWN_S = 30  # on SIGTERM, open streams get this long to finish


def settings_help() -> str:
    from api_client.gateway.settings import ENV_PREFIX, GatewaySettings

    lines = []
    for name, field in GatewaySettings.model_fields.items():
        default = "unset" if field.default is None else repr(field.default)
        lines.append(f"  {ENV_PREFIX}{name.upper():<36} default {default}\n      {field.description}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m api_client.gateway", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="OpenAI-compatible HTTP gateway over the tokenrelay job queue.",
        epilog="settings (environment variables):\n" + settings_help())
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from api_client.gateway.settings import GatewaySettings

    try:
        settings = GatewaySettings()
    except (ValidationError, ValueError) as exc:
        print(f"gateway: bad configuration: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from api_client.gateway.app import create_app

    app = create_app(settings)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # Streams still open when the grace period ends are cut, not cancelled: their jobs run
            # on and their results stay readable from Redis.
            app.state.gateway.is_stopping = True
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=settings.gateway_host, port=settings.gateway_port,
                            log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
