"""Store: persists tasks, trajectories and dead letters in SQL, assembles GRPO groups, answers queries."""
