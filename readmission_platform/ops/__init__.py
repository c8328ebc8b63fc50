"""The operating configuration: metric names, SLOs, alerts and dashboards, and the files generated from them."""
