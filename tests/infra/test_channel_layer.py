"""The channel layer's Redis connections as configured."""

from __future__ import annotations

from channels.layers import get_channel_layer


def test_an_idle_websocket_outlives_the_layers_blocking_read() -> None:
    # A consumer waits for its next message with a blocking read of ``brpop_timeout`` seconds;
    # with a socket read timeout no longer than that (redis-py's default is as long), the read
    # sometimes timed out first and the consumer, and its websocket, died while idle.
    layer = get_channel_layer()
    for host in layer.hosts:
        assert host["socket_timeout"] > layer.brpop_timeout
        pool = layer.create_pool(0)
        assert pool.connection_kwargs["socket_timeout"] > layer.brpop_timeout
