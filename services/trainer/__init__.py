"""The trainer: consumes GRPO groups, steps the policy with verl's core algorithms, publishes weights."""
