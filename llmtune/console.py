"""The terminal: one rich console for progress and summaries (stdout) and errors (stderr)."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
error_console = Console(stderr=True, highlight=False, soft_wrap=True)
