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
ports that are free when it starts, bound to the serve's `--host`: Ray's HAProxy template binds
them on every interface and has no setting for the address, so the workers of the Ray that
`raypost serve` starts put the host into the template (`bind_haproxy_side_ports`, from the
worker setup hook) before the proxy renders it. Where the template does not have the expected
lines (another Ray), it is left alone and the ports listen on every interface.
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


def use_high_throughput_serve(host: str = "") -> dict[str, str]:
    """Put the switches (and free HAProxy side ports on `host`, "" = every interface) in this
    process's environment for a local Ray started after it; returns them."""
    from raypost.runtime import SERVE_BIND_ENV

    for key, value in HIGH_THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value)
    for key in HAPROXY_PORT_ENV:
        os.environ.setdefault(key, str(free_port(host)))
    if host and host != "0.0.0.0":
        os.environ.setdefault(SERVE_BIND_ENV, host)
    return {key: os.environ[key] for key in (*HIGH_THROUGHPUT_ENV, *HAPROXY_PORT_ENV)}


SIDE_PORT_BINDS = ("bind :{{ config.metrics_port }}", "bind *:{{ config.stats_port }}")


def bind_haproxy_side_ports(host: str) -> bool:
    """Bind HAProxy's metrics and stats listeners to `host` instead of every interface, in this
    process's copy of Ray's template; True when the template had the lines to change."""
    try:
        from ray.serve._private import haproxy
    except ImportError:
        return False
    template = haproxy.HAPROXY_CONFIG_TEMPLATE
    if not all(line in template for line in SIDE_PORT_BINDS):
        return False
    for line in SIDE_PORT_BINDS:
        template = template.replace(line, line.replace("bind :", f"bind {host}:").replace("bind *:", f"bind {host}:"))
    haproxy.HAPROXY_CONFIG_TEMPLATE = template
    return True
