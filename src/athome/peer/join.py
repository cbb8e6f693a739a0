"""``peer join``: a volunteer hosts (and trains) a shard of the run's experts.

Start-up order: join the DHT through the run address, verify the run config against the coordinator's peer ID,
choose experts, build them (from a checkpoint, from a live replica, or from the uid's deterministic init),
serve them, declare them, and print ``serving experts: <uids>``; then, every ``--status_every`` seconds, a
``status:`` line with the calls served and the replica averaging rounds (what ``peer demo`` shows for hosts).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Collection, Dict, Optional, Sequence

import torch

from athome.averaging.replica import ExpertReplicaAverager
from athome.config import RunConfig
from athome.dht import (
    Identity,
    RunAddress,
    RunAddressError,
    RunConfigError,
    fetch_run_config,
    get_records,
    protect_run_keys,
    start_dht,
    store_record,
)
from athome.dht.auth import InviteError, NotAdmitted, start_membership
from athome.dht.identity import DEFAULT_IDENTITY_DIR
from athome.dht.schemas import PeerRecord, ServerRecord, run_key
from athome.lifecycle import PeriodicThread, die, emit, restore_interrupt_handler, shutdown_requested
from athome.model.expert import build_expert, expert_input_schema
from athome.devices import resolve_device, resolve_precision
from athome.netflags import dht_kwargs
from athome.peer.backend import ExpertBackend
from athome.peer.checkpoint import CheckpointSaver, load_expert
from athome.peer.experts import (
    ExpertPatternError,
    choose_least_replicated,
    count_replicas,
    expand_pattern,
    experts_that_fit,
)
from athome.peer.reachability import CLIENT, RELAYED, choose_serving_mode
from athome.peer.server import Declarer, ExpertServer, download_expert_state
from athome.verification.downloads import (
    DEFAULT_MAX_SOURCES,
    StateRejected,
    combine_replica_states,
    replica_state,
)

logger = logging.getLogger(__name__)
MAX_BATCH_SIZE = 16384  # tokens per request; trainers split larger requests


def memory_budget_bytes(device: torch.device, max_memory_gb: Optional[float]) -> int:
    if max_memory_gb is not None:
        return int(max_memory_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.8)
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = int(available * 0.25)
    logger.info(f"Expert memory budget {budget / 2**30:.1f} GiB (override with --max_memory GB)")
    return budget


def choose_experts(args: argparse.Namespace, config: RunConfig, dht, peer_id: str, device, precision) -> list[str]:
    if args.experts != "auto":
        try:
            return expand_pattern(args.experts, config.model)
        except ExpertPatternError as error:
            die(str(error))
    servers = get_records(dht, run_key(config.name, "servers"), ServerRecord)
    replicas = count_replicas({peer: record.experts for peer, (record, _) in servers.items()}, exclude_peer=peer_id)
    grid_size = len(config.model.expert_uids())
    if args.num_experts is not None:
        count = args.num_experts
    else:
        fit, per_expert, working = experts_that_fit(
            config.model, precision, args.offload, config.optimizer.expert_accumulation,
            memory_budget_bytes(device, args.max_memory), MAX_BATCH_SIZE, device.type,
        )
        count = min(grid_size, fit)
        hint = "; --offload fits ~6x more" if device.type == "cuda" and not args.offload and count < grid_size else ""
        logger.info(f"Hosting {count} experts, sized to the memory budget: {per_expert / 2**20:.1f} MiB each between "
                    f"requests, {working / 2**20:.0f} MiB set aside for the request in flight (override with "
                    f"--num_experts{hint})")
    uids = choose_least_replicated(config.model, replicas, min(count, grid_size), peer_id)
    logger.info(
        f"auto picked the least-replicated experts {', '.join(uids)} "
        f"(replicas before joining: {', '.join(str(replicas.get(u, 0)) for u in uids)}; override with --experts)"
    )
    return uids


def build_backend(
    uid: str, config: RunConfig, args: argparse.Namespace, device, precision, checkpoint_dir: Path, dht, live_hosts,
    banned: Collection[str] = frozenset(),
) -> ExpertBackend:
    """An expert, restored from our checkpoint, else combined from live replicas (:func:`copy_from_replicas`, never
    from a ``banned`` host), else freshly initialised."""
    module = build_expert(config.model, uid)
    origin = "a fresh deterministic init"
    has_checkpoint = (checkpoint_dir / f"{uid}.safetensors").exists()
    if not has_checkpoint and live_hosts.get(uid):
        origin = copy_from_replicas(dht, uid, module, live_hosts[uid], banned) or origin
    backend = ExpertBackend(
        uid,
        module,
        optimizer_config=config.optimizer,
        precision=precision,
        device=device,
        offload=args.offload,
        args_schema=expert_input_schema(config.model),
        max_batch_size=MAX_BATCH_SIZE,
    )
    if has_checkpoint and load_expert(backend, checkpoint_dir):
        origin = f"checkpoint {checkpoint_dir}"
    logger.info(f"{uid}: starting from {origin}")
    return backend


def copy_from_replicas(
    dht, uid: str, module: torch.nn.Module, hosts: Sequence[str], banned: Collection[str] = frozenset(),
    sources: int = DEFAULT_MAX_SOURCES, timeout: float = 30.0,
) -> Optional[str]:
    """Load ``module`` (the uid's deterministic init) with its live replicas' weights, as trainers download state.

    One malicious replica must not hand its weights to every newcomer, so the weights come from up to ``sources``
    replicas (random order, never a banned host; a replica that fails or serves weights of other names, shapes,
    dtypes or with NaN/Inf is skipped, logged, and the next one tried) and are combined by
    :func:`athome.verification.downloads.combine_replica_states`: the median of three, one of two that agree,
    one alone with a warning. When they cannot be combined (two that disagree) ``module`` keeps its init.

    :returns: where the weights came from, for the log; None if ``module`` was left as it was
    """
    own = module.state_dict()
    candidates = [host for host in hosts if host not in banned]
    random.shuffle(candidates)  # no replica chooses to be a source by its place in the DHT record
    if len(candidates) < len(hosts):
        logger.info(f"{uid}: not copying from {len(hosts) - len(candidates)} banned replica(s)")
    states = []
    with ThreadPoolExecutor(max_workers=sources, thread_name_prefix="replica download") as pool:
        while candidates and len(states) < sources:
            batch, candidates = candidates[:sources - len(states)], candidates[sources - len(states):]
            downloads = [pool.submit(download_expert_state, dht, host, uid, timeout) for host in batch]
            for host, download in zip(batch, downloads):
                try:
                    states.append(replica_state(own, host, download.result()))
                except StateRejected as error:
                    logger.error(f"{uid}: refused the weights served by the replica on {host}: {error}")
                except Exception as error:  # noqa: B902 - one failed replica only removes that source
                    logger.warning(f"{uid}: could not copy from {host}: {error!r}; trying the next replica")
    if not states:
        logger.warning(f"{uid}: no live replica served usable weights; starting from the uid's deterministic init")
        return None
    try:
        combined, how = combine_replica_states(own, states, max_sources=sources)
    except StateRejected as error:
        logger.warning(f"{uid}: not copying the live replicas ({error}); starting from the uid's deterministic "
                       f"init, which replica averaging then pulls towards the swarm's weights")
        return None
    module.load_state_dict(combined)
    return f"the live replicas: {how}" if len(states) > 1 else f"the live replica on {how}"


def other_hosts_by_uid(dht, config: RunConfig, own_peer_id: str) -> Dict[str, list]:
    """uid -> peer IDs of the other live hosts that declare it (from the run's server records)."""
    hosts: Dict[str, list] = {}
    for peer_id, (record, _) in get_records(dht, run_key(config.name, "servers"), ServerRecord).items():
        if peer_id != own_peer_id:
            for uid in record.experts:
                hosts.setdefault(uid, []).append(peer_id)
    return hosts


def replica_directory(dht, config: RunConfig, own_peer_id: str) -> Callable[[str], bool]:
    """``has_partners(uid)``: does another live host declare ``uid``? One DHT read per half averaging period,
    shared by all of this host's experts; when the read fails the answer is True (try the round anyway)."""
    lock = threading.Lock()
    cache: Dict[str, object] = {"read_at": -float("inf"), "uids": None}

    def has_partners(uid: str) -> bool:
        with lock:
            if time.monotonic() - cache["read_at"] > config.averaging.period / 2:
                try:
                    cache["uids"] = set(other_hosts_by_uid(dht, config, own_peer_id))
                except Exception as error:
                    logger.debug(f"Could not read the expert declarations: {error!r}")
                    cache["uids"] = None
                cache["read_at"] = time.monotonic()
            return cache["uids"] is None or uid in cache["uids"]

    return has_partners


def host_status_line(backends: Dict[str, ExpertBackend], replica_averagers: Sequence[ExpertReplicaAverager],
                     uptime: float) -> str:
    """``status: ...``: the expert calls served so far and the replica averaging rounds, for the volunteer."""
    calls = sum(b.num_forward_calls + b.num_backward_calls for b in backends.values())
    ok = sum(a.rounds_ok for a in replica_averagers)
    failed = sum(a.rounds_failed for a in replica_averagers)
    skipped = sum(a.rounds_skipped for a in replica_averagers)
    # short enough for one row of `peer demo`'s table; "skipped": no other live replica of that expert
    return (
        f"status: {len(backends)} experts served {calls} calls ({calls / max(uptime, 1e-3):.1f}/s); "
        f"replica rounds: {ok} ok, {failed} failed, {skipped} skipped"
    )


def start_replica_averaging(
    dht, config: RunConfig, backends: Dict[str, ExpertBackend], live_hosts: Dict[str, list], own_peer_id: str
) -> list[ExpertReplicaAverager]:
    """Average each hosted expert with its replicas on other hosts, every ``averaging.period`` seconds.

    Rounds run in background processes; serving waits only for the copies in and out of the expert. A round is
    skipped while no other host declares the expert (a lone host would only log failed matchmaking).
    """
    averaging = config.averaging
    has_partners = replica_directory(dht, config, own_peer_id)
    averagers = []
    for uid, backend in backends.items():
        averagers.append(ExpertReplicaAverager(
            dht, uid, backend.master_parameters, run_prefix=config.key_prefix, lock=backend.master_lock,
            target_group_size=averaging.target_group_size, period=averaging.period,
            expected_replicas=len(live_hosts.get(uid, ())) + 1, reducer=averaging.reducer,
            clip_tau=averaging.clip_tau, clip_iterations=averaging.clip_iterations, compression=averaging.compression,
            direct_tcp=averaging.direct_tcp,
            same_host_reads=averaging.same_host_reads,
            has_partners=lambda uid=uid: has_partners(uid),
        ))
    logger.info(
        f"Averaging {len(averagers)} experts with their replicas every {averaging.period:.0f}s "
        f"({averaging.reducer}, {averaging.compression}; set [averaging] in the run config)"
    )
    return averagers


def train_only(dht, identity: Identity, config: RunConfig, args: argparse.Namespace, stop: threading.Event) -> None:
    """A peer nobody can reach serves nothing; it still trains (client mode), until stopped."""
    from athome.trainer.train import Trainer

    emit("serving experts: none (unreachable: client mode, training only)")
    try:
        Trainer(dht, identity, config, args).run(stop)
    finally:
        dht.shutdown()


def run_join(args: argparse.Namespace) -> None:
    try:
        address = RunAddress.parse(args.run)
    except RunAddressError as error:
        die(str(error))
    if not args.status_every > 0:
        die(f"--status_every must be a positive number of seconds, got {args.status_every}")
    if getattr(args, "attack", None):
        from athome.verification.attacks import AttacksDisabled, check_attack_flag

        try:
            check_attack_flag(args.attack, "host")
        except (ValueError, AttacksDisabled) as error:
            die(f"--attack: {error}")
    identity = Identity.load_or_create(args.identity_path)
    stop = shutdown_requested()
    args.initial_peers = [address.maddr, *args.initial_peers]
    try:
        dht = start_dht(identity, **dht_kwargs(args))
    except (InviteError, NotAdmitted) as error:  # the message already says what to do
        die(f"could not join the run at {address}: {error}")
    except Exception as error:
        die(f"could not join the run at {address}: {error}\nis the coordinator up? does `peer check` pass?")
    try:
        config = fetch_run_config(dht, address.coordinator_id)
    except RunConfigError as error:
        dht.shutdown()
        die(str(error))
    dht, serving, _ = choose_serving_mode(  # direct, through the run's relay, or (reachable by nobody) client
        dht, args, address.coordinator_id,
        lambda **changes: start_dht(identity, run_name=config.name, **{**dht_kwargs(args), **changes}),
    )
    protect_run_keys(dht, identity, config.name)
    start_membership(dht, identity, config.name, address.coordinator_id, args.invite, config.expert_ttl)
    logger.info(f"Joined run '{config.name}' as {identity.peer_id}")
    if serving == CLIENT:
        return train_only(dht, identity, config, args, stop)

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    uids = choose_experts(args, config, dht, identity.peer_id, device, precision)
    checkpoint_dir = Path(args.checkpoint_dir or DEFAULT_IDENTITY_DIR / config.name / identity.peer_id)
    live_hosts = other_hosts_by_uid(dht, config, identity.peer_id)
    from athome.verification.integration import follow_bans_on_host

    host_bans = follow_bans_on_host(dht, config.name, address.coordinator_id)  # banned peers' requests are refused
    host_bans.refresh()  # and banned hosts are no source of our experts' weights
    backends = {
        uid: build_backend(uid, config, args, device, precision, checkpoint_dir, dht, live_hosts, host_bans.banned)
        for uid in uids
    }
    if getattr(args, "attack", None):
        from athome.verification.integration import attack_host

        attack_host(backends, args.attack)  # testing only (checked above)

    started_at = time.time()

    def make_record() -> ServerRecord:
        uptime = max(time.time() - started_at, 1e-3)
        samples = sum(backend.samples_processed for backend in backends.values())
        return ServerRecord(
            experts=list(backends), public_name=args.public_name, device=device.type, precision=precision,
            throughput=samples / uptime / max(len(backends), 1), relayed=serving == RELAYED, since=started_at,
            expert_calls=sum(b.num_forward_calls + b.num_backward_calls for b in backends.values()),
            reported_at=time.time(),
        )

    def get_state(uid: str):
        backend = backends.get(uid)
        return None if backend is None else backend.state_dict()["master"]

    declarer = Declarer(dht, run_key(config.name, "servers"), make_record, ttl=config.expert_ttl)
    server = ExpertServer(
        dht, backends, declarer=declarer, get_state=get_state, num_handlers=1, max_batch_size=MAX_BATCH_SIZE,
        max_queue_seconds=getattr(args, "max_queue_seconds", 5.0), device=device,
    )
    server.run_in_background(await_ready=True)
    presence = PeriodicThread(
        lambda: store_record(
            dht, run_key(config.name, "peers"),
            PeerRecord(role="expert_host", public_name=args.public_name, team=args.team, started_at=started_at),
            config.expert_ttl,
        ),
        period=config.expert_ttl / 3, name="presence",
    )
    presence.start()
    saver = CheckpointSaver(backends, checkpoint_dir, every_updates=100, every_seconds=60)
    saver.start()
    replica_averagers = start_replica_averaging(dht, config, backends, live_hosts, identity.peer_id)

    def exclude_banned_replicas() -> None:  # a banned host's parameters never enter our experts' averages
        host_bans.refresh()
        for averager in replica_averagers:
            averager.averager.ban_peers(host_bans.banned)

    ban_follower = PeriodicThread(exclude_banned_replicas, period=10.0, name="replica bans")
    ban_follower.start()
    status = PeriodicThread(
        lambda: emit(host_status_line(backends, replica_averagers, time.time() - started_at)),
        period=args.status_every, name="status", run_first=False,
    )
    restore_interrupt_handler()  # hivemind's averagers switch Ctrl+C off in this process
    if declarer.declared.wait(timeout=60):
        emit(f"serving experts: {','.join(backends)}")
    else:
        logger.warning("Still no DHT node accepted the declaration after 60 s; serving anyway, will keep trying")
    status.start()

    trainer_thread = None
    if args.train:
        from athome.trainer.train import Trainer

        trainer = Trainer(dht, identity, config, argparse.Namespace(**{**vars(args), "attack": None}),
                          coordinator_id=address.coordinator_id)  # --attack is this host's, not its trainer's
        trainer_thread = threading.Thread(target=trainer.run, args=(stop,), name="trainer", daemon=True)
        trainer_thread.start()
    try:
        stop.wait()
    finally:
        logger.info("Leaving: saving checkpoints and withdrawing declarations")
        presence.stop()
        ban_follower.stop()
        status.stop()
        for averager in replica_averagers:
            averager.shutdown()
        saver.stop()
        if trainer_thread is not None:
            trainer_thread.join(timeout=30)
        server.shutdown()  # withdraws declarations, stops handlers, runtime and the DHT
