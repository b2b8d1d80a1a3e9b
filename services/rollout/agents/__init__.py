"""Built-in agents; importing this package registers them."""

from services.rollout.agents import copy_task, echo_digit, null, openai_sdk  # noqa: F401
