"""The rank<->collector contract: frames, limits, metric columns, CURVE keys. No sockets, no threads."""
