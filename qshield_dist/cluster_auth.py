"""Token authentication for a Ray cluster (cluster.py starts the nodes).

A fresh token per cluster (`secrets.token_hex(32)`, what `ray get-auth-token` uses), written
to a 0600 file in a 0700 directory and handed to Ray only through the environment
(`RAY_AUTH_TOKEN_PATH`), never on a command line: argv is world-readable in `ps`. Every
process of a cluster (head, workers, drivers) needs the same token.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def is_loopback(address: str) -> bool:
    """Whether a host or host:port stays on this machine: any 127.0.0.0/8 or ::1 address (Debian
    maps the hostname to 127.0.1.1), 'localhost', or RayExecutor's 'local'. The one rule, used by
    Python and, through `python -m qshield_dist.cluster is-loopback`, by slurm/run.sh."""
    host = address.strip()
    if host.startswith("["):  # [::1]:6379
        host = host[1:].split("]")[0]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    if host in ("localhost", "local"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token_file(directory: str | os.PathLike[str] | None = None) -> Path:
    """A fresh random token in `directory/ray_auth_token` (0600; the directory made 0700)."""
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="qshield-ray-"))
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    path = root / "ray_auth_token"
    path.unlink(missing_ok=True)
    # O_EXCL + mode at creation: the token is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


def auth_env(
    token_file: str | os.PathLike[str] | None, loopback: bool = False, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a Ray process (node or driver) of a token-authenticated cluster."""
    env = dict(os.environ if base is None else base)
    for var in _AUTH_VARS:
        env.pop(var, None)
    if token_file is not None:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(Path(token_file).resolve())
    if loopback:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    else:  # multi-node: a value inherited from a loopback setup would make Ray refuse
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def use_token_in_this_process(token_file: str | os.PathLike[str] | None, loopback: bool = False) -> None:
    """Point this process's Ray client at `token_file` (call before ray.init).

    Ray reads RAY_AUTH_MODE into a cached config and caches the token in a C++ singleton,
    so both are refreshed here; this lets one process talk to successive clusters.
    """
    new = auth_env(token_file, loopback, base={})
    for var in _AUTH_VARS:
        os.environ.pop(var, None)
    os.environ.update(new)
    if not loopback:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    try:
        from ray._private import ray_constants
        from ray._raylet import AuthenticationTokenLoader, Config

        # Read once at import: without this, ray.init('127.0.0.1:P') would rewrite the
        # address to the host's external IP and the driver would leave loopback.
        ray_constants.ENABLE_RAY_CLUSTER = not loopback
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as exc:  # older/newer Ray: env alone must do
        log.debug("could not refresh Ray's auth caches: %s", exc)
