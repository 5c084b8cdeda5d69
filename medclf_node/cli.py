"""`medclf-node` command line: the only place that reads argv and the environment.

Each subcommand is a small function ``cmd_<name>(args) -> int`` registered in
:func:`build_parser`; the work itself lives in the library modules.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medclf_node.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO/DEBUG, including patient attributes in some messages.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the config file (and, as they exist, rules/peers/models) and say what is wrong."""
    cfg = _load(args)
    print(f"{args.config or '(defaults)'}: configuration is valid")
    print(f"  node: {cfg.node.ae_title} on {cfg.node.host}:{cfg.node.port}, data in {cfg.node.data_dir}")
    allowed = cfg.allowed_calling_ae_titles()
    print(f"  accepts calling AE titles: {'any' if allowed is None else sorted(allowed)}")
    print(f"  peers: {', '.join(p.name for p in cfg.peers) or '(none)'}")
    print(f"  results to: {', '.join(cfg.results.destinations)}")
    for rule in cfg.effective_rules():
        print(f"  rule {rule.name}: models {rule.models}")
    return 0


COMMANDS: dict[str, tuple[Command, str]] = {
    "config-check": (cmd_config_check, "validate a configuration file"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclf-node", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, help="override node.log_level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=None, help="TOML configuration file")
        p.set_defaults(func=func)
        extra = EXTRA_ARGUMENTS.get(name)
        if extra is not None:
            extra(p)
    return parser


# Subcommands that take more than --config register an argument builder here.
EXTRA_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "INFO")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
