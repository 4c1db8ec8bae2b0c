"""The pipeline stages. Each is a function `stage(recipe, run_dir, force) -> Outcome`."""

from llmtune.stages.export import export
from llmtune.stages.merge import merge
from llmtune.stages.prepare import prepare
from llmtune.stages.train import train

STAGES = {"prepare": prepare, "train": train, "merge": merge, "export": export}
