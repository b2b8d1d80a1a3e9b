"""Text-to-SQL: a write / check / rewrite agent over SQLite databases, rewarded by execution match.

- `databases`: three small SQLite databases (shop, school, library) generated from code and a
  fixed seed, built on first use into a cache directory (`database_path(db_id)`).
- `data`: questions with gold SQL from templates over those databases (`make_dataset(n, seed)`).
- `sql`: pulling SQL out of model text, and read-only, time- and row-limited execution.
- `reward`: execution match of a query's result against the gold query's result.
- `spider`: rows in the same shape from Spider-format data (`load_spider`).
- `agent`: the `text-to-sql` agent.
"""
