"""``peer``: the one command line of athome. Each subcommand's implementation lives in its subsystem."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from athome.lifecycle import exit_without_finalizers, guard_against_orphans, setup_logging
from athome.netflags import add_network_flags


def _coordinator(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("coordinator", help="start a run: bootstrap node, signed config, dashboard")
    parser.add_argument("--config", default=None, help="run config TOML (default: the built-in demo run)")
    parser.add_argument("--data_dir", default="athome_coordinator", help="where metrics and credits are stored")
    parser.add_argument("--http_host", default="127.0.0.1", help="dashboard address (0.0.0.0 to show it publicly)")
    parser.add_argument("--invite_only", action="store_true", help="admit only peers holding a `peer invite` token")
    parser.add_argument("--http_port", type=int, default=8080, help="dashboard port (0 = any free port)")
    parser.add_argument("--check_rate", type=float, default=None,
                        help="share of trusted trainers' steps the coordinator recomputes (default: the run config's)")
    add_network_flags(parser, default_port=31337)
    parser.set_defaults(handler="athome.coordinator.node:run_coordinator")


def _invite(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("invite", help="organizer: issue a signed invitation to an invite-only run")
    parser.add_argument("--expires_in", type=float, default=24 * 7, metavar="H", help="hours the invitation is valid")
    parser.add_argument("--peer_id", default="", help="only this peer may use it (default: whoever holds it)")
    parser.add_argument("--data_dir", default="athome_coordinator", help="the coordinator's --data_dir (finds its key)")
    parser.add_argument("--identity_path", default=None, help="the coordinator's key (default: DATA_DIR/coordinator.key)")
    parser.set_defaults(handler="athome.coordinator.invite:run_invite")


def _status(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("status", help="show a run: config (verified), live peers and experts")
    parser.add_argument("--run", required=True, help="the run address printed by `peer coordinator`")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for the run config")
    add_network_flags(parser)
    parser.set_defaults(handler="athome.peer.status:run_status")


def _check(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("check", help="check this machine: torch, GPU, p2pd, port, and whether a run can reach it")
    parser.add_argument("--run", default=None, help="also ask this run's coordinator to dial this peer back")
    add_network_flags(parser)
    parser.set_defaults(handler="athome.peer.check:run_check")


def _join(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("join", help="volunteer: host and train mixture-of-experts shards")
    parser.add_argument("--run", required=True, help="the run address printed by `peer coordinator`")
    parser.add_argument("--experts", default="auto", help="'auto', or a pattern like 'ffn.0.[0:8]' or 'ffn.0.3,ffn.1.[0:4]'")
    parser.add_argument("--num_experts", type=int, default=None, help="how many experts 'auto' picks")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--offload", action="store_true", help="keep fp32 master weights and optimizer on the CPU")
    parser.add_argument("--max_memory", type=float, default=None, help="GB of device memory experts may use")
    parser.add_argument("--public_name", default="", help="your name on the leaderboard")
    parser.add_argument("--team", default="", help="your team on the leaderboard")
    parser.add_argument("--checkpoint_dir", default=None, help="where expert checkpoints go (default ~/.athome/<run>)")
    parser.add_argument("--train", action="store_true", help="also run a trainer in this process")
    parser.add_argument("--status_every", type=float, default=30.0,
                        help="seconds between status lines (expert calls served, replica averaging rounds)")
    parser.add_argument("--max_queue_seconds", type=float, default=5.0,
                        help="refuse expert requests (busy) while more than this much work is queued: backpressure")
    parser.add_argument("--attack", default=None,
                        help="testing only (needs ATHOME_ALLOW_ATTACKS=1): make this peer malicious, e.g. sign_flip")
    add_network_flags(parser)
    parser.set_defaults(handler="athome.peer.join:run_join")


def _train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train the model through the swarm's experts")
    parser.add_argument("--run", required=True, help="the run address printed by `peer coordinator`")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch_size", type=int, default=None, help="sequences per step (default: the run config's)")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--max_minutes", type=float, default=None, help="stop after this many minutes")
    parser.add_argument("--public_name", default="", help="your name on the leaderboard")
    parser.add_argument("--team", default="", help="your team on the leaderboard")
    parser.add_argument("--log_file", default=None, help="append one JSON line per step here")
    parser.add_argument("--no_progress", action="store_true", help="log lines instead of a live progress bar")
    parser.add_argument("--attack", default=None,
                        help="testing only (needs ATHOME_ALLOW_ATTACKS=1): make this peer malicious, e.g. sign_flip")
    add_network_flags(parser)
    parser.set_defaults(handler="athome.trainer.train:run_train")


def _demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run a whole swarm on 127.0.0.1 and show the loss fall")
    parser.add_argument("--expert_hosts", type=int, default=3, help="peer join processes hosting experts (default 3)")
    parser.add_argument("--trainers", type=int, default=2, help="peer train processes (default 2)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="steps per trainer")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 2)")
    parser.add_argument("--config", default=None,
                        help="run config TOML to try on 127.0.0.1 before publishing it (default: the built-in demo run)")
    parser.add_argument("--out", default="demo_out", help="where logs and loss.png go")
    parser.add_argument("--http_port", type=int, default=0, help="dashboard port (0 = any free port)")
    parser.add_argument("--attack", default=None,
                        help="testing only (ATHOME_ALLOW_ATTACKS=1): add one malicious peer, e.g. sign_flip")
    parser.add_argument("--attacker", default=None, choices=["trainer", "host"],
                        help="which peer --attack adds (default: from the attack's kind)")
    parser.add_argument("--check_rate", type=float, default=None,
                        help="the coordinator's check rate for trusted trainers (default: 0.5 with --attack, else the "
                             "run config's)")
    parser.set_defaults(handler="athome.demo:run_demo")


def _leaderboard(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("leaderboard", help="show a run's leaderboard, as its coordinator ranks it")
    parser.add_argument("--run", default=None, help="the run address printed by `peer coordinator`")
    parser.add_argument("--dashboard", default=None, help="the dashboard URL printed by `peer coordinator` (skips the DHT)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--limit", type=int, default=100, help="rows to show (1-1000)")
    parser.add_argument("--offset", type=int, default=0, help="rows to skip")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for the run config")
    add_network_flags(parser)
    parser.set_defaults(handler="athome.coordinator.leaderboard:run_leaderboard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peer", description="athome: train one mixture-of-experts model with volunteers")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_coordinator, _invite, _join, _train, _status, _leaderboard, _check, _demo):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    guard_against_orphans()
    module_name, function_name = args.handler.split(":")
    import importlib

    handler = getattr(importlib.import_module(module_name), function_name)
    handler(args)
    if argv is None:  # run as the `peer` program, not called as a library function
        exit_without_finalizers()


if __name__ == "__main__":
    sys.exit(main())
