"""The list of commands `blda` offers. A command is added here only once it works."""

from blda_cli.diagnose import diagnose_command
from blda_cli.synthcity import synthcity

ALL = [diagnose_command, synthcity]
