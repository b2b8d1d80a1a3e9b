"""Helpers shared by several test modules: factories, in-process services, waiting.

Plain functions and classes only; shared fixtures live in conftest.py files (tests/conftest.py
for every kind, tests/integration/conftest.py for the integration tests'). Test modules import
from here, never from one another.
"""
