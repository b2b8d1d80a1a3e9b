"""Example agents and datasets: the kinds of work relayrl trains agents for.

Each subpackage holds an agent (registered through the `relayrl.agents` entry points in
pyproject.toml), a dataset generator, a reward function and a `train.yaml`.
"""
