"""A reproducible zoo of tiny character-level Llama models for testing merges and fitness.

`zoo.build.build_zoo(out, preset="tiny", seed=0)` trains a base model, one full
fine-tune per synthetic task and LoRA adapters for some tasks, writes one held-out
benchmark per task, evaluates every model on every benchmark and writes `zoo.json`.
Modules: `tokenizer` (character-level HF tokenizer), `tasks` (generators of
(prompt, answer) pairs), `train` (the seeded training loop, reusable elsewhere),
`presets` (sizes and budgets), `benchmarks` (the JSONL files), `build` (the pipeline).
"""
