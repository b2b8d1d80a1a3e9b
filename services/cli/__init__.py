"""The `relayrl` command line: start the embedded stack, submit tasks, follow them."""
