"""The pipeline stages, one package each, read top to bottom from its __init__: prepare, train,
merge, export. Each is a function `stage(recipe, run_dir, force) -> Outcome`; llmtune.pipeline
runs them in order. plan.py and memory.py price them before they run."""
