"""Calculator tool use: an agent solves generated GSM8K-style word problems, calling a safe
`calculator(expression)` function tool over OpenAI tool calling; reward 1 for the right number.

Modules: `calc` (the sandboxed evaluator behind the tool), `data` (the seeded problem
generator), `reward` (answer extraction and the exact-match reward), `agent` (the tool loop,
registered as agent "calculator"); `train.yaml` and `rows.jsonl` are a run over them.
"""
