"""The `dipnode` command line: parsing (main.py), the subcommands (commands.py), what the
options mean (options.py), the operator's views (admin.py, progress.py) and the demo."""
