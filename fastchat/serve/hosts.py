"""Where our servers listen, and the warning when that is beyond this machine."""
from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger("fastchat.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # any other host name may resolve to an outside address
        return False


def warn_if_not_loopback(host: str, server: str) -> None:
    """Nothing authenticates the traffic between controller and workers, so say so when others can reach it."""
    if not is_loopback(host):
        log.warning("%s listening on %s, which is not a loopback address: there is no authentication between the "
                    "controller and its workers (anyone who reaches their ports can register a worker or send and "
                    "read requests), and the OpenAI API server checks keys only with --api-keys. Listen on "
                    "127.0.0.1, or keep these ports behind a firewall.", server, host)
