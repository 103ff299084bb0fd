"""The ``hsm-proxy`` commands: the command line and what dev, check and doctor do."""
