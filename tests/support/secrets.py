"""The services' shared secrets for tests: generated once per test session, never fixed values.

`tests/conftest.py` puts them into the environment (`RELAYRL_INFERENCE_TOKEN`,
`RELAYRL_WEIGHTS_KEY`) for the whole session, so every settings model a test builds, and every
service process it starts, has them the way a deployment would; services still refuse to start
without them. Clients that call inference directly send `AUTH` as their headers.
"""

from __future__ import annotations

from shared.config import new_secret

INFERENCE_TOKEN_ENV = "RELAYRL_INFERENCE_TOKEN"
WEIGHTS_KEY_ENV = "RELAYRL_WEIGHTS_KEY"

INFERENCE_TOKEN = new_secret()
WEIGHTS_KEY = new_secret()
# What the rollout workers send inference.
AUTH = {"Authorization": f"Bearer {INFERENCE_TOKEN}"}
