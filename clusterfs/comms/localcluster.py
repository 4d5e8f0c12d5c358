"""Configs for dev and test clusters on 127.0.0.1 (free ports, a fresh key).

Only loopback addresses are ever produced here.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from clusterfs.config import ClusterConfig, load_config, parse_config

LOOPBACK = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def local_config_text(node_ids: list[int], *, key: bytes | None = None,
                      heartbeat_interval: float = 0.2, failure_timeout: float = 1.5,
                      dead_on_refusal: bool = True, name: str = "test",
                      ports: list[int] | None = None, answer_timeout: float | None = None,
                      probe_timeout: float | None = None) -> str:
    key = key if key is not None else secrets.token_bytes(32)
    ports = ports if ports is not None else free_ports(len(node_ids))
    lines = [f'name = "{name}"', f'key = "{key.hex()}"', "", "[timeouts]",
             f"heartbeat_interval = {heartbeat_interval}",
             f"failure_timeout = {failure_timeout}", "connect_timeout = 1.0",
             f"dead_on_refusal = {'true' if dead_on_refusal else 'false'}"]
    if answer_timeout is not None:
        lines.append(f"answer_timeout = {answer_timeout}")
    if probe_timeout is not None:
        lines.append(f"probe_timeout = {probe_timeout}")
    lines.append("")
    for nid, port in zip(node_ids, ports, strict=True):
        lines += ["[[node]]", f"id = {nid}", f'name = "n{nid}"',
                  f'address = "{LOOPBACK}:{port}"', ""]
    return "\n".join(lines)


def local_config(node_ids: list[int], **kw: object) -> ClusterConfig:
    import tomllib

    return parse_config(tomllib.loads(local_config_text(node_ids, **kw)))  # type: ignore[arg-type]


def write_local_config(path: str | os.PathLike[str], node_ids: list[int],
                       **kw: object) -> ClusterConfig:
    Path(path).write_text(local_config_text(node_ids, **kw))  # type: ignore[arg-type]
    return load_config(path)
