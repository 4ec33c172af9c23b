"""One module per CLI command family; merge_cli/cli.py only wires them onto the typer app.

A command module imports `merge_cli.commands.common` (error handling, console, option helpers) and never
the app itself, so no command imports the CLI back.
"""
