"""The run side of each command: `run(args) -> int` and its helpers, one module per command of
selfsteer.cli (whose module of the same name holds its parser). cli/main.py imports a module here only
when that command runs, so `selfsteer --help` and `selfsteer COMMAND --help` stay torch-free."""
