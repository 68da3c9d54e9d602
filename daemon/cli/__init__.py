"""The actprm command line: the typer app (main.py) and its command groups."""
