"""`medclf-node` command line: the only place that reads argv and the environment.

Each subcommand is a small function ``cmd_<name>(args) -> int`` registered in
:func:`build_parser`; the work itself lives in the library modules.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medclf_node import redact
from medclf_node.config import Config, ConfigError, load_config
from medclf_node.inference.registry import ModelLoadError

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
    # highdicom narrates every module it copies (with UIDs) at INFO when building SR/SC objects.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # no patient data in any log line, whoever writes it (values shown by kind and length only)
    redact.install()


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _describe_destination(cfg: Config, name: str) -> str:
    folder = cfg.folder(name)
    return f"{name} (folder {folder.path})" if folder is not None else name


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the config file (and, as they exist, rules/peers/models) and say what is wrong."""
    cfg = _load(args)
    print(f"{args.config or '(defaults)'}: configuration is valid")
    print(f"  node: {cfg.node.ae_title} on {cfg.node.host}:{cfg.node.port}, data in {cfg.node.data_dir}")
    allowed = cfg.allowed_calling_ae_titles()
    print(f"  accepts calling AE titles: {'any' if allowed is None else sorted(allowed)}")
    print(f"  peers: {', '.join(p.name for p in cfg.peers) or '(none)'}")
    print(f"  results to: {', '.join(_describe_destination(cfg, d) for d in cfg.results.destinations)}")
    for rule in cfg.effective_rules():
        print(f"  rule {rule.name}: models {rule.models}")
    return _check_rules_cli(cfg)


def _check_rules_cli(cfg: Config) -> int:
    """Selection-rule problems (unknown models, unmatchable rules); 1 when there are any."""
    from medclf_node.inference.registry import ModelLoadError, discover
    from medclf_node.ingest.selection import check_rules

    try:
        known: list[str] | None = sorted(discover(cfg.models.directory)[0])
    except ModelLoadError as exc:
        print(f"  note: {exc}; model names in rules not checked")
        known = None
    problems = check_rules(cfg.effective_rules(), known)
    for problem in problems:
        print(f"  problem: {problem}")
    return 1 if problems else 0



# --- node commands: serve / echo / send / jobs / retry ---------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node until SIGTERM/SIGINT."""
    import signal
    import threading

    from medclf_node.node import build_node

    cfg = _load(args)
    if args.log_level is None:
        logging.getLogger().setLevel(cfg.node.log_level)
    node = build_node(cfg)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        port = node.start()
    except OSError as exc:
        print(f"cannot listen on {cfg.node.host}:{cfg.node.port}: {exc.strerror}", file=sys.stderr)
        node.stop()
        return 1
    print(f"medclf-node listening on {cfg.node.host}:{port} as {cfg.node.ae_title}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
    return 0


def _peer_arg(cfg: Config, name: str) -> tuple[str, str, int]:
    try:
        p = cfg.peer(name)
    except KeyError:
        known = ", ".join(q.name for q in cfg.peers) or "(none)"
        raise ConfigError(f"unknown peer {name!r}; known [[peers]]: {known}") from None
    return p.ae_title, p.host, p.port


def _peer_tls(cfg: Config, name: str) -> ssl.SSLContext | None:
    """The TLS client context for a peer with ``tls = true`` (certificates from [tls]), else None."""
    from medclf_node.net.tls import client_context

    return client_context(cfg.tls) if cfg.peer(name).tls else None


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a configured peer."""
    from medclf_node.net.scu import Peer, SendError, echo

    cfg = _load(args)
    peer = Peer(*_peer_arg(cfg, args.peer), tls=_peer_tls(cfg, args.peer))
    try:
        status = echo(peer, local_ae=cfg.node.ae_title, timeout=cfg.dispatch.timeout_seconds)
    except SendError as exc:
        print(f"echo {args.peer}: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"echo {args.peer} ({peer.ae_title}@{peer.host}:{peer.port}): status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_peers(args: argparse.Namespace) -> int:
    """List every configured peer and C-ECHO it (in parallel); 1 if any does not answer Success."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from medclf_node.net.scu import Peer, SendError, echo

    cfg = _load(args)
    if not cfg.peers:
        print("(no peers configured)")
        return 0
    timeout = args.timeout if args.timeout is not None else cfg.dispatch.timeout_seconds

    def probe(peer: Peer) -> tuple[bool, str, float]:
        t0 = time.monotonic()
        try:
            status = echo(peer, local_ae=cfg.node.ae_title, timeout=timeout)
            ok, text = status == 0, ("ok" if status == 0 else f"status 0x{status:04X}")
        except SendError as exc:
            ok, text = False, f"FAILED: {exc}"
        return ok, text, (time.monotonic() - t0) * 1000.0

    peers = [Peer(p.ae_title, p.host, p.port, tls=_peer_tls(cfg, p.name)) for p in cfg.peers]
    with ThreadPoolExecutor(max_workers=min(8, len(peers))) as pool:
        outcomes = list(pool.map(probe, peers))
    width = max(4, *(len(p.name) for p in cfg.peers))
    print(f"{'name':<{width}}  {'AE':<16}  {'host:port':<28}  {'ms':>7}  status")
    for p, (_ok, text, ms) in zip(cfg.peers, outcomes, strict=True):
        print(f"{p.name:<{width}}  {p.ae_title:<16}  {f'{p.host}:{p.port}':<28}  {ms:>7.1f}  {text}")
    failed = sum(1 for ok, _t, _ms in outcomes if not ok)
    if failed:
        print(f"{failed} of {len(peers)} peer(s) did not answer C-ECHO with Success", file=sys.stderr)
    return 1 if failed else 0


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files/folders to a configured peer."""
    from medclf_node.net.scu import Peer, SendError, expand_paths, send_files

    cfg = _load(args)
    peer = Peer(*_peer_arg(cfg, args.to), tls=_peer_tls(cfg, args.to))
    files = expand_paths(args.paths)
    if not files:
        print("no files to send", file=sys.stderr)
        return 1
    try:
        results = send_files(peer, files, local_ae=cfg.node.ae_title, timeout=cfg.dispatch.timeout_seconds)
    except SendError as exc:
        print(f"send to {args.to}: FAILED: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    for r in failed:
        why = r.error or f"status 0x{r.status or 0:04X}"
        print(f"  {r.path}: {why}", file=sys.stderr)
    print(f"sent {len(results) - len(failed)}/{len(results)} file(s) to {args.to}")
    return 0 if not failed else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    """Table of series and their states."""
    from medclf_node.store import StoreError, StoreMissing, open_store

    cfg = _load(args)
    try:
        index = open_store(cfg, read_only=True)  # a query never creates or upgrades the store
    except StoreMissing as exc:
        print(f"(no series: {exc})")
        return 0
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        rows = index.list_series(states=args.state or None, limit=args.limit)
        print(f"{'series':<44} {'state':<10} {'n':>5} {'model(s)':<28} {'score':>6}  {'timings (s)':<30} reason")
        for r in rows:
            results = index.results(r.series_uid)
            models = ",".join(f"{x.model_name}" for x in results) or "-"
            score = f"{max(x.probability for x in results):.3f}" if results else "-"
            timings = " ".join(f"{k}={v:.2f}" for k, v in r.timings.items()) or "-"
            reason = " ".join(x for x in (r.reason_code, r.reason_text) if x) or "-"
            print(f"{r.series_uid[:44]:<44} {r.state:<10} {r.n_instances:>5} {models[:28]:<28} {score:>6}  "
                  f"{timings[:30]:<30} {reason}")
        if not rows:
            print("(no series)")
    finally:
        index.close()
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Re-queue dead-lettered outbox items."""
    from medclf_node.store import StoreError, StoreMissing, open_store

    cfg = _load(args)
    if not args.all and not args.series:
        print("give --all or one or more series UIDs", file=sys.stderr)
        return 2
    try:
        open_store(cfg, read_only=True).close()  # exists? retry never creates a store
        index = open_store(cfg)
    except StoreMissing as exc:
        print(f"re-queued 0 item(s): {exc}")
        return 0
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        n = index.requeue_dead(None if args.all else args.series)
    finally:
        index.close()
    print(f"re-queued {n} item(s); a running node sends them within a second")
    return 0


def _args_echo(p: argparse.ArgumentParser) -> None:
    p.add_argument("peer", help="peer name from [[peers]]")


def _args_peers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for each peer (default: dispatch.timeout_seconds)")


def _args_send(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, help="peer name from [[peers]]")
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (searched recursively)")


def _args_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", action="append", help="only series in this state (repeatable)")
    p.add_argument("--limit", type=int, default=200, help="at most this many rows (newest first)")


def _args_retry(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="re-queue every dead item")
    p.add_argument("series", nargs="*", help="series UIDs whose dead items to re-queue")


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole loop on loopback: synthetic studies in, SR + SC out, findings printed."""
    from medclf_node.demo import DemoError, run_demo

    models_dir = args.models if args.models is not None else _load(args).models.directory
    if args.log_level is None:
        logging.getLogger().setLevel(logging.WARNING)  # the demo narrates; the node stays quiet
    try:
        findings = run_demo(args.out, models_dir=models_dir, say=lambda m: print(m, flush=True))
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"{'study':<14} {'truth':<12} {'finding':<30} {'p':>6}  {'state':<6} key image")
    for f in findings:
        truth = f"{f.truth_nodules} nodule(s)" if f.truth_nodules else "no nodule"
        verdict = "-" if f.positive is None else ("PRESENT" if f.positive else "absent")
        prob = "-" if f.probability is None else f"{f.probability:.3f}"
        print(f"{f.patient_id:<14} {truth:<12} {f.finding or '-'}: {verdict:<9} {prob:>6}  {f.state:<6} "
              f"{f.sc_png or '-'}")
    agree = sum(f.agrees_with_truth for f in findings)
    print(f"\n{agree}/{len(findings)} findings agree with the phantoms' ground truth; "
          f"results took {findings[0].seconds:.1f} s from the first image sent. "
          "AI result - not for primary diagnosis.")
    return 0


def _args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("medclf-demo"), help="where SC PNGs and received objects go")
    p.add_argument("--models", type=Path, default=None, help="models directory (default: the config's)")


COMMANDS: dict[str, tuple[Command, str]] = {
    "config-check": (cmd_config_check, "validate a configuration file"),
    "serve": (cmd_serve, "run the node (C-STORE intake, completion, pipeline, dispatch)"),
    "echo": (cmd_echo, "C-ECHO a configured peer"),
    "peers": (cmd_peers, "list every configured peer and C-ECHO it"),
    "send": (cmd_send, "C-STORE files or folders to a configured peer"),
    "jobs": (cmd_jobs, "list series with state, model, score and timings"),
    "retry": (cmd_retry, "re-queue dead-lettered result objects"),
    "demo": (cmd_demo, "push two synthetic studies through a temporary node and show the results"),
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
EXTRA_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "echo": _args_echo,
    "peers": _args_peers,
    "send": _args_send,
    "jobs": _args_jobs,
    "retry": _args_retry,
    "demo": _args_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "INFO")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except ModelLoadError as exc:
        print(f"cannot load models: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
