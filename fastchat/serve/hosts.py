"""Where our servers listen, and the warning when that is beyond this machine."""
from __future__ import annotations

import ipaddress
import logging
import socket

from fastchat.records import write_text_atomic

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


def listen(host: str, port: int) -> socket.socket:
    """A socket this process binds itself. With port 0 the system picks a free port at bind time, so no other
    process can take it between choosing and binding (the race of choosing a port in one process and binding it
    in another: two pipelines started together on one machine)."""
    address = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    return sock


def serve(app, sock: socket.socket, port_file: str | None = None, log_level: str = "warning") -> None:
    """Serve `app` with uvicorn on `sock`; with `port_file`, write the bound port there (atomically) first, for
    the process that started this one and passed --port 0."""
    import uvicorn

    if port_file:
        write_text_atomic(port_file, f"{sock.getsockname()[1]}\n")
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


def add_listen_args(p, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=default_port, help=f"(default {default_port}; 0 = a free port the "
                   "server binds itself, written to --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port to this file once listening starts")
