"""Running a trained model: loading it from a run, generation, losses, eval, the preview, and
serving prompts as training saw them. Shared by the eval and preview steps and by generate and chat."""
