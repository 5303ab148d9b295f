"""Ray Serve's high-throughput mode for the Ray that raypost starts itself.

Two switches from Ray's own guide (Ray >= 2.55): HAProxy, written in C, takes the Python proxy
actor's place in front of the ingress, and the throughput-optimized data plane sends requests
between deployments over gRPC and runs routing and user code on each replica's own event loop.
On 2 cores a trivial Serve request took 4.3 ms through the default proxy and 0.7 ms this way.

Serve reads these flags when its processes start, so they have to be in the environment of the
Ray that hosts the application: set here before a local Ray starts (its processes inherit them);
on a cluster they belong in the pods' environment, as k8s/base/rayservice.yaml has them. A value
the caller already set wins.
"""

from __future__ import annotations

import os

HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def use_high_throughput_serve() -> dict[str, str]:
    """Put the switches in this process's environment for a local Ray started after it; returns them."""
    for key, value in HIGH_THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in HIGH_THROUGHPUT_ENV}
