"""CLI commands of the train step (filled in by its issue)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this step's commands to the root app."""
