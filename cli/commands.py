"""The list of commands `blda` offers. A command is added here only once it works."""

ALL: list = []
