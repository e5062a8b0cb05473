"""The `blda` command line: thin click commands over `blda_tools` (installed as `blda_cli`)."""
