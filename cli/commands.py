"""The list of commands `blda` offers. A command is added here only once it works."""

from blda_cli.calibrate import calibrate_command, export_command
from blda_cli.demo import demo_command
from blda_cli.diagnose import diagnose_command
from blda_cli.dump_logits import dump_logits_command
from blda_cli.synthcity import synthcity
from blda_cli.train import plot_log_command, train_command

ALL = [
    demo_command,
    dump_logits_command,
    diagnose_command,
    calibrate_command,
    export_command,
    train_command,
    plot_log_command,
    synthcity,
]
