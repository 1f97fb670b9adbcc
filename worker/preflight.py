"""Checks `python -m worker` runs before it loads the model: settings that cannot work should fail in
a second with what to change (exit 2), not after a minute of loading with a traceback (exit 1)."""

from __future__ import annotations

import errno
import socket

from worker.settings import ENV_PREFIX, WorkerSettings


def device_problem(device: str) -> str | None:
    """Why `device` cannot run the engine on this machine (a message naming the fix), or None."""
    if device == "cpu":
        return None
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        return f"{ENV_PREFIX}DEVICE={device!r} is not a device: use cpu, cuda or cuda:N"
    import torch  # here, not at the top: `--check` and `--help` must not pay for importing torch

    if torch.version.cuda is None:
        return (f"{ENV_PREFIX}DEVICE={device} but this torch ({torch.__version__}) is a build without CUDA: "
                f"install a CUDA build of torch (e.g. `TORCH_SPEC=torch bash scripts/setup.sh`), "
                f"or set {ENV_PREFIX}DEVICE=cpu")
    num_devices = torch.cuda.device_count()
    if num_devices == 0:
        return (f"{ENV_PREFIX}DEVICE={device} but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                "GPU: check the NVIDIA driver (`nvidia-smi`), CUDA_VISIBLE_DEVICES and, in a container, the GPU "
                f"reservation; or set {ENV_PREFIX}DEVICE=cpu")
    index = int(device[5:]) if ":" in device else 0
    if index >= num_devices:
        return (f"{ENV_PREFIX}DEVICE={device} but only {num_devices} GPU(s) are visible (cuda:0 to "
                f"cuda:{num_devices - 1})")
    return None


def metrics_port_problem(host: str, port: int) -> str | None:
    """Why /metrics cannot listen on host:port (taken, or an address this host does not have), or None.
    Binds the way the metrics server will (SO_REUSEADDR, as http.server does), then lets go."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{ENV_PREFIX}METRICS_HOST={host!r} is not an address of this host ({exc})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"the metrics port {host}:{port} is already in use (another worker on this host?): set "
                        f"{ENV_PREFIX}METRICS_PORT to a free port, or 0 to turn /metrics off")
            return f"cannot serve /metrics on {host}:{port} ({exc}): change {ENV_PREFIX}METRICS_HOST or _PORT"
    return None


def model_problem(model: str | None) -> str | None:
    """A model that cannot be there (a missing path, no embedded model installed), or None. Whether a
    hub id can be downloaded is only known by trying, when the engine starts."""
    from engine.model_files import ModelNotFoundError, locate_model

    try:
        locate_model(model)
    except ModelNotFoundError as exc:
        return f"cannot start the engine: {exc}"
    return None


def problems(settings: WorkerSettings) -> list[str]:
    """Every check that needs neither Redis nor the model's weights."""
    found = [model_problem(settings.model), device_problem(settings.device),
             metrics_port_problem(settings.metrics_host, settings.metrics_port)]
    return [p for p in found if p is not None]
