"""TCP passthrough: the protocol handler that relays a connection's decrypted bytes to a TCP
upstream, and the PROXY protocol v2 header that may precede them."""
