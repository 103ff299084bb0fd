"""The ``hsm-proxy`` commands: the command line and what dev, check, doctor, key and csr do."""
