"""The side-by-side benchmark against nginx (bench/run.sh); not part of the proxy package."""
