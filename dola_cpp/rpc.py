"""The ggml RPC servers a model's offloaded layers are split across, as ``Model(rpc=...)`` takes them."""

from __future__ import annotations

from typing import Sequence, Union


def rpc_endpoints(rpc: Union[str, Sequence[str], None]) -> list[str]:
    """``"host:port,host:port"`` or a list of them, checked."""
    if rpc is None:
        return []
    items = rpc.split(",") if isinstance(rpc, str) else list(rpc)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"rpc endpoints are 'host:port' strings, got {item!r}")
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rpc endpoint {item.strip()!r} is not host:port")
        out.append(item.strip())
    if not out:
        raise ValueError("rpc needs at least one host:port")
    return out
