"""The live gateway (CONTRACT 9): positions from the Redis stream to WebSocket clients and a live map page.

A separate process (``telemetry-processor gateway``) beside the processor: it reads the stream with plain
XREAD (no group, nothing acknowledged), keeps each device's latest position, and pushes coalesced updates
to subscribed clients. Modules, one concern each:

- ``config``: GATEWAY_* variables and the shared ones, validated once;
- ``source``: the stream's last id, the snapshot from ``positions``, then XREAD from that id, in a thread;
- ``latest``: the forward-only latest position per device and the set changed since the last flush;
- ``subscriptions``: what a client asked for, grouped into distinct subscriptions encoded once per flush;
- ``clients``: one connection's pending updates (at most one per subscription) and its sender;
- ``auth``: HS256 JWTs as Directus issues them;
- ``protocol``: the JSON messages of CONTRACT 9;
- ``server``: the asyncio WebSocket/HTTP server, the flush loop and the stop sequence;
- ``metrics``: the ``gateway_`` metrics; ``page``: the live map at ``/`` (``static/map.html``).

The core never imports this package; it needs the ``gateway`` extra (websockets, PyJWT).
"""
