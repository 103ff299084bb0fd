"""HTTP/2 to clients on python-hyper's h2: the protocol handler and its pure rules."""
