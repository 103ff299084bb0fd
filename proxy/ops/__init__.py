"""Operating the proxy: metrics, admin endpoints, readiness, logs, operator safety."""
