"""relayrl services; each runs as `python -m services.<name>` and never imports another."""
