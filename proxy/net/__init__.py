"""The network layer: listeners, admission, the connection pipeline, TCP sockets, workers;
the only package that awaits sockets (docs/ARCHITECTURE.md)."""
