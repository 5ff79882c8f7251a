"""TRL's parser of a `selfsteer ... train` command's config dataclasses (`intervener train`, `reflect
train`): every field a flag of its own name, `--config FILE.yaml` sets any of them and the command line's
flags win over it; an unknown flag or key, an unreadable file or a bad value exits 2 (argparse's way)
naming it."""

from __future__ import annotations

import argparse

import yaml
from trl import TrlParser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class ConfigParser(TrlParser):
    def __init__(self, dataclass_types: tuple[type, ...], *, prog: str, description: str):
        super().__init__(dataclass_types, prog=prog, description=description, formatter_class=_Formatter)
        self.names = " or ".join(cls.__name__ for cls in dataclass_types)
        # TrlParser reads `--config FILE` itself (before the other flags); declared here for --help only.
        self.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="a YAML mapping of field names to values; the command line's flags win over it",
        )

    def error(self, message):  # the message without the usage of 200 flags
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every flag)\n")

    def parse(self, argv: list[str]) -> tuple:
        """One instance of each dataclass: the fields from `--config FILE.yaml`, then the flags over them.
        Exits 0 after --help."""
        argv = list(argv)
        for i, arg in enumerate(argv):  # TrlParser reads `--config FILE`, not `--config=FILE`
            if arg.startswith("--config="):
                argv[i : i + 1] = ["--config", arg.split("=", 1)[1]]
                break
        if argv.count("--config") > 1:
            self.error("--config given more than once")
        if argv and argv[-1] == "--config":
            self.error("argument --config: expected a YAML file")
        try:
            # after the dataclasses: the namespace of --config (declared for --help), the unknown keys, flags
            *configs, _, from_file, from_command_line = self.parse_args_and_config(
                args=argv, return_remaining_strings=True, separate_remaining_strings=True
            )
        except OSError as error:
            self.error(f"--config: cannot read {error.filename}: {error.strerror}")
        except yaml.YAMLError as error:
            self.error(f"--config: not YAML: {error}")
        except (TypeError, ValueError) as error:  # a YAML file that is not a mapping, a bad value of a field
            self.error(str(error))
        if from_command_line:
            self.error(f"unrecognized arguments: {' '.join(from_command_line)}")
        if from_file:  # TrlParser hands back each unknown key as `--KEY VALUE`
            unknown = ", ".join(key.removeprefix("--") for key in from_file[::2])
            self.error(f"--config {argv[argv.index('--config') + 1]}: not fields of {self.names}: {unknown}")
        return tuple(configs)
