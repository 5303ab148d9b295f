"""Ray Serve's high-throughput mode for the Ray that raypost starts itself.

Two switches from Ray's own guide (Ray >= 2.55): HAProxy, written in C, takes the Python proxy
actor's place in front of the ingress, and the throughput-optimized data plane sends requests
between deployments over gRPC and runs routing and user code on each replica's own event loop.
On 2 cores a trivial Serve request took 4.3 ms through the default proxy and 0.7 ms this way.

Serve reads these flags when its processes start, so they have to be in the environment of the
Ray that hosts the application: set here before a local Ray starts (its processes inherit them);
on a cluster they belong in the pods' environment, as k8s/base/rayservice.yaml has them. A value
the caller already set wins.

HAProxy also opens a stats page and a Prometheus endpoint, on fixed ports by default (8404,
9101): a second `raypost serve` on the same machine then dies binding them. A local Ray gets two
ports that are free when it starts. Ray's HAProxy template binds both on every interface and has
no setting for the address; on a host reachable from outside, firewall them or pass
`--no-high-throughput`.
"""

from __future__ import annotations

import os
import socket

HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY_PORT_ENV = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def free_port(host: str = "") -> int:
    """A port nobody listens on now, on `host` ("" = every interface, as HAProxy binds these)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def use_high_throughput_serve() -> dict[str, str]:
    """Put the switches (and free HAProxy side ports) in this process's environment for a local
    Ray started after it; returns them."""
    for key, value in HIGH_THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value)
    for key in HAPROXY_PORT_ENV:
        os.environ.setdefault(key, str(free_port()))
    return {key: os.environ[key] for key in (*HIGH_THROUGHPUT_ENV, *HAPROXY_PORT_ENV)}
