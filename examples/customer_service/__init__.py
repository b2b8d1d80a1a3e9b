"""Customer service with tools: an agent resolves order-status, refund and return-label requests
against a generated shop database (SQLite, built at run time), talking to a scripted customer.

- `shop`: the generated catalogue, customers and orders; the refund/return policy; the SQLite
  cache; the three tools (`lookup_order`, `calculate_refund`, `create_return_label`).
- `data`: `make_dataset(n, seed)`, the tasks (customer, opening message, intent, order, expected).
- `reward`: the composite reward (completion 0.5, quality 0.3, efficiency 0.2).
- `agent`: the `customer-service` agent, its conversation state and the testable `step`.
"""
