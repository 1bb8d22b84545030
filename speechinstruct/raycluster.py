"""Joining Ray, and naming its nodes and its errors: what every step run on Ray shares (``extract`` and ``score``
on :mod:`speechinstruct.units.engine_ray`'s actors, ``shard audio``'s VAD tasks)."""

from __future__ import annotations

import os
import time


def node_name() -> str:
    """The node this process runs on, as summaries count work per node: its IP address and node id."""
    import ray

    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


def reason_of(error: Exception, whole: bool = False) -> str:
    """The last line of a Ray error (the remote error's own message, without its class name), to its first
    sentence unless ``whole``."""
    import re

    line = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    line = re.sub(r"^[\w.]+(?:Error|Exception): ", "", line)
    return line[:500] if whole else line.split(". ")[0][:300]


def _answers(address: str | None, timeout: float = 10.0) -> None:
    """One line when nothing listens at a cluster's ``host:port`` (``ray://`` too): Ray itself retries for
    minutes against a GCS address and gives up on a Ray-client one after 30 s with a hint about tokens."""
    import socket

    if not address or address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, colon, port = target.rpartition(":")
    if not colon or not port.isdigit():  # no port: Ray's defaults
        host, port = target, ("10001" if address.startswith("ray://") else "6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"ray address {address}: cannot connect: nothing answers at {host}:{port} "
                         f"({e.strerror or type(e).__name__}); is the cluster up (`ray status` on its head node)?") from None


def connect(address: str | None):
    """Start or join Ray (``address``: None starts a local runtime, ``"auto"`` or ``host:6379`` joins a cluster
    from one of its nodes, ``ray://host:10001`` connects as a Ray client); one clear line when that cannot be done."""
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'speechinstruct[ray]'") from None
    if ray.is_initialized():
        return ray
    _answers(address)
    options = {"ignore_reinit_error": True, "log_to_driver": False}
    if not (address or "").startswith("ray://"):
        options.update(include_dashboard=False, configure_logging=False)
    try:
        for attempt in range(3):
            try:
                ray.init(address=address, **options)
                break
            except ConnectionAbortedError:
                # Seen with Ray 2.60: the first Ray-client connection to a fresh cluster can fail with
                # "Initialization failure from server" (the proxy's first per-client server dies at start);
                # the next one goes through.
                if attempt == 2:
                    raise
                time.sleep(1.0)
    except ImportError as e:
        raise ValueError(f"ray address {address}: {e} (pip install 'speechinstruct[ray]' installs ray[client])") from None
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                " (a cluster with token authentication, the default of `ray start` since Ray 2.59, needs "
                "RAY_AUTH_MODE=token here too, and its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
        raise ValueError(f"ray address {address}: cannot connect: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{hint}") from None
    return ray
