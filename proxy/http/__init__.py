"""HTTP/1.1: the sans-IO forwarding rules on h11, the client exchange, the upstream pool."""
