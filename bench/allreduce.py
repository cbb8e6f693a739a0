"""All-reduce of one fp32 vector among N peer processes on 127.0.0.1: athome vs torch.distributed (gloo) vs stock
hivemind, plus athome's bytes sent per peer relative to the bandwidth-optimal 2(N-1)/N * S.

Every peer is a separate process (forked). Per N, in one run:

* gloo: ``dist.all_reduce`` of the same tensor (after a warm-up), time = slowest rank, run first and again after
  every other variant, median of both slots' reps (at least ``GLOO_MIN_REPS`` per slot on loopback; athome's
  variants: at least ``ATHOME_MIN_REPS``);
* hivemind: stock ``DecentralizedAverager`` (no compression, mean), run first and again last (baseline = mean);
* athome: ``RobustAverager`` with reducer x compression variants (fp16 only with ``--variants all``), over its
  direct data plane: every peer is on this host, so raw parts are read from the other processes' memory
  (same-host reads, the default); once over TCP as between hosts ("athome tcp ...": ``same_host_reads=False``, as
  the codec variants, whose point is network bytes), and once with the plane off ("athome p2p ...": parts through
  p2pd, as before the plane).

For the averagers, the group is formed first (``step(require_trigger=True)``), all peers pass a barrier, and the
clock runs from the trigger to the slowest peer's result: matchmaking is excluded, so the numbers compare the
all-reduce proper with gloo's. Each averager first runs one untimed warm-up round (gloo too). Bytes are counted by
athome's runner (frames, or serialized messages over p2p, sent to other peers); S is the vector size *as sent* (after compression), so
bytes/optimal measures the protocol, not the codec. ``cpu-s/peer`` is the CPU time one peer's processes (worker,
DHT, averager, p2pd; for gloo the worker) used per round, counted until every peer finished: on a shared, loaded box
the CPU ratios are much steadier than the wall-time ones, and a ``allreduce_cpu`` line reports them. On a VM, each
group also prints the CPU steal during it (time the host gave its other tenants, from ``/proc/stat``): wall ratios
move with it.

The last line is ``allreduce N=4 athome/gloo: X.XX, athome/hivemind: Y.YY, bytes/optimal: Z.ZZ`` for athome with its
default reducer (centered_clip) and no compression, at N=4 (or the first N given if 4 is not among them).

    python bench/allreduce.py                     # 10M floats, N in 2,4,8, 1 timed rep: ~3-5 min on 2 cores
    python bench/allreduce.py --peers 4 --reps 5   # tighter numbers for one N
    python bench/allreduce.py --sizes 1000000 --peers 2,4 --variants mean
    sudo python bench/allreduce.py --link_mbit 100 --peers 4   # every peer behind its own 100 Mbit/s link

With ``--link_mbit M`` (root; :mod:`athome.testing.netlab`), every peer runs in its own network namespace whose
uplink is shaped with tc tbf to M Mbit/s in each direction, and each variant's time is also divided by the time the
link allows, ``2(N-1)/N * S / (M/8 MB/s)`` (S = vector bytes as sent): column ``/link``, and a line
``allreduce_link N=4 athome/link: X.XX, gloo/link: Y.YY`` before the last line. That formula is the right limit
for this topology (each peer sends and receives 2(N-1)/N * S through its own link, both directions shaped) but it
counts payload only: tbf shapes whole Ethernet frames, so TCP/IP/Ethernet headers (66 B per 1448 B segment) put
the reachable floor near 1.05 (measured: 61-63 MB left each peer's veth per round for 60 MB of parts and results).
A row ``plain TCP, no waiting`` sends the butterfly's bytes (2/N of the vector from every peer to every other
peer, all at once) over plain TCP: what the links give that pattern of flows when nobody waits for anybody.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

import multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

# (label, kind, reducer, compression). Stock hivemind runs first and last: on a shared box the load drifts during a
# run, so the baseline is the mean of both (measured: the same variant varied 1.3x between its slots).
VARIANTS = (
    ("hivemind none/mean", "hivemind", "mean", "none"),
    ("athome none/mean", "athome", "mean", "none"),
    ("athome none/centered_clip", "athome", "centered_clip", "none"),
    ("athome tcp none/centered_clip", "athome", "centered_clip", "none"),
    ("athome p2p none/centered_clip", "athome", "centered_clip", "none"),
    ("athome fp16/centered_clip", "athome", "centered_clip", "fp16"),
    ("athome uint8/centered_clip", "athome", "centered_clip", "uint8"),
    ("hivemind none/mean (again)", "hivemind", "mean", "none"),
)
DEFAULT_VARIANTS = "hivemind,athome none/mean,athome none/centered_clip,tcp,p2p,uint8"  # fp16 with --variants all
# "tcp": the data plane without same-host reads (parts over TCP even between processes of one host, as between
# hosts); "p2p": the data plane off (parts through p2pd as protobuf, athome before the plane). Codecs save network
# bytes: on one host parts are read raw from memory and skip them, so the codec variants run over TCP
VARIANT_KWARGS = {
    "athome tcp none/centered_clip": dict(same_host_reads=False),
    "athome p2p none/centered_clip": dict(direct_tcp=False),
    "athome fp16/centered_clip": dict(same_host_reads=False),
    "athome uint8/centered_clip": dict(same_host_reads=False),
}
SUMMARY_VARIANT = "athome none/centered_clip"
FLOOR_LABEL = "plain TCP, no waiting"  # --link_mbit only: see _plain_tcp_exchange
GLOO_MIN_REPS = 10  # timed gloo all-reduces on loopback, whatever --reps says
# timed rounds per athome variant on loopback, whatever --reps says: one round takes ~0.1 s and a single one on a shared
# 2-core box ranged 0.109-0.172 s in one session, so a one-rep median moved the summary ratio by up to 0.5
ATHOME_MIN_REPS = 5
ATHOME_KWARGS: dict = {}  # extra RobustAverager arguments for every athome variant (--part_size_bytes)


@dataclass
class Measurement:
    label: str
    seconds: float  # slowest peer, median over reps
    bytes_ratio: float  # mean over peers of bytes_sent / (2 (N-1)/N * S_sent); nan if not counted
    vector_mib: float  # S as sent
    cpu: float = float("nan")  # CPU seconds per peer per round (its processes: averager, DHT, p2pd), mean


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_tree(root: int) -> list[int]:
    """Process ``root`` and all its descendants (e.g. DHT, averager, p2pd), from one scan of /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # the process ended while we listed
    tree, changed = {root}, True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return sorted(tree)


def _cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes (ended ones count 0). Reading a few stat files
    costs ~0.1 ms; scanning all of /proc (:func:`_process_tree`) ~2 ms, which would land in the measured rounds."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _enter_netns(netns: str) -> None:
    """Move this (single-threaded, just forked) process into a network namespace; its threads and children follow."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns({netns}) failed")
    finally:
        os.close(fd)


def _plain_tcp_exchange(rank: int, n: int, vector, host_ip: str, reps: int) -> float:
    """The butterfly's traffic without its waiting: every peer sends 2/N of the vector's bytes to every other peer
    at once, over plain TCP (one connection per ordered pair, kernel defaults). Median seconds of ``reps``, slowest
    peer; a floor for what the links allow with this many flows (needs torch.distributed initialized)."""
    import threading

    import torch
    import torch.distributed as dist

    payload = memoryview(vector.numpy()).cast("B")[: 2 * vector.numel() * 4 // n]
    listener = socket.create_server((host_ip, 0))
    addresses = [None] * n
    dist.all_gather_object(addresses, (host_ip, listener.getsockname()[1]))
    incoming = []
    acceptor = threading.Thread(target=lambda: incoming.extend(listener.accept()[0] for _ in range(n - 1)))
    acceptor.start()
    outgoing = [socket.create_connection(address) for peer, address in enumerate(addresses) if peer != rank]
    acceptor.join()
    buffers = [bytearray(len(payload)) for _ in incoming]

    def receive(connection: socket.socket, buffer: bytearray) -> None:
        view, received = memoryview(buffer), 0
        while received < len(view):
            count = connection.recv_into(view[received:])
            if count == 0:
                raise ConnectionError("a peer closed its connection before sending everything")
            received += count

    times = []
    for _ in range(reps):
        dist.barrier()
        started = time.perf_counter()
        threads = [threading.Thread(target=c.sendall, args=(payload,)) for c in outgoing]
        threads += [threading.Thread(target=receive, args=pair) for pair in zip(incoming, buffers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = torch.tensor([time.perf_counter() - started])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    for connection in [*outgoing, *incoming, listener]:
        connection.close()
    return statistics.median(times)


def _worker(rank, n, size, reps, port, tag, variants, maddr_queue, barrier, results, place=None) -> None:
    # place: None (127.0.0.1) or (netns, ip, device, gloo master ip) inside a NetLab
    host_ip, master_ip = "127.0.0.1", "127.0.0.1"
    if place is not None:
        netns, host_ip, device, master_ip = place
        _enter_netns(netns)
        os.environ["GLOO_SOCKET_IFNAME"] = device

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N peers share 2 cores; don't oversubscribe
    vector = torch.randn(size, generator=torch.Generator().manual_seed(rank))

    # --- gloo
    dist.init_process_group("gloo", init_method=f"tcp://{master_ip}:{port}", rank=rank, world_size=n)
    buffer = vector.clone()
    dist.all_reduce(buffer)  # warm-up (connections)
    gloo_times, gloo_cpus = [], []

    def _time_gloo() -> None:
        # on loopback gloo's all-reduce takes ~0.05 s and one slow rep on a shared box moves it 1.5x: the denominator
        # of every ratio gets at least GLOO_MIN_REPS reps per slot; over a shaped link one rep is steady and 5 s long
        for _ in range(reps if place is not None else max(reps, GLOO_MIN_REPS)):
            buffer.copy_(vector)
            dist.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()  # gloo's threads live in this process
            dist.all_reduce(buffer)
            elapsed = torch.tensor([time.perf_counter() - started])
            cpu = torch.tensor([time.process_time() - cpu_started])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            dist.all_reduce(cpu)
            gloo_times.append(float(elapsed))
            gloo_cpus.append(float(cpu) / n)

    _time_gloo()
    if place is not None:
        floor = _plain_tcp_exchange(rank, n, vector, host_ip, reps)
        if rank == 0:
            results.put(("floor", floor))

    # --- DHT
    import hivemind
    from hivemind.averaging.control import AveragingStage

    from athome.averaging import RobustAverager, get_codec

    if rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{host_ip}/tcp/0"])
        for _ in range(n - 1):
            maddr_queue.put([str(a) for a in dht.get_visible_maddrs()])
    else:
        dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{host_ip}/tcp/0"], initial_peers=maddr_queue.get())
    barrier.wait()

    common = dict(
        target_group_size=n, min_group_size=n, min_matchmaking_time=3.0, request_timeout=1.0, start=True
    )
    for label, kind, reducer, compression in variants:
        prefix = f"bench_{label.replace(' ', '_').replace('/', '_')}_{tag}"
        if kind == "hivemind":
            averager = hivemind.DecentralizedAverager([vector.clone()], dht, prefix=prefix,
                                                      compression=get_codec(compression), **common)
        else:
            averager = RobustAverager([vector.clone()], dht, prefix=prefix, reducer=reducer,
                                      compression=compression, **common, **ATHOME_KWARGS,
                                      **VARIANT_KWARGS.get(label, {}))
        times, ratios = [], []
        # rep -1 is an untimed warm-up (first rounds pay one-off costs, as gloo's does)
        for rep in range(-1, _variant_reps(kind, reps, shaped=place is not None)):
            with averager.get_tensors() as tensors:
                tensors[0].copy_(vector)
            control = averager.step(wait=False, require_trigger=True, timeout=120)
            while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
                time.sleep(0.01)
            # the CPU count comes before the barrier: after it, a peer still counting would hold back the all-reduce
            # that the others' clocks already measure
            if rep == -1:  # the averager's processes exist from start=True on: list them once, outside the count
                processes = _process_tree(os.getpid())
            cpu_started = _cpu_of(processes)
            barrier.wait()
            started = time.perf_counter()
            control.allow_allreduce()
            try:
                control.result(timeout=300)
            except Exception as e:  # a failed round is reported, and the other peers are not left at the barrier
                if rep >= 0:
                    results.put(("fail", label, rank, repr(e)[:200]))
                barrier.wait()
                continue
            elapsed = time.perf_counter() - started
            if kind == "athome":
                deadline = time.monotonic() + 5
                while len(averager.round_history()) < rep + 2:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
                report = averager.last_round
                optimal = 2 * (n - 1) / n * report.vector_bytes
                ratios.append(report.bytes_sent / optimal)
            barrier.wait()  # every peer is done: whatever this peer did for the others is counted too
            cpu = _cpu_of(processes) - cpu_started
            if rep >= 0:
                times.append(elapsed)
                results.put(("rep", label, rank, elapsed, ratios[-1] if ratios else float("nan"), cpu))
        averager.shutdown()
        barrier.wait()
    dht.shutdown()
    # gloo again, after every variant (as stock hivemind): the baseline is the median of both slots' reps, so that a
    # box whose load drifts during the run weighs on gloo as on the variants (measured in one session: gloo's
    # median moved from 0.059 to 0.12 s between runs minutes apart)
    _time_gloo()
    if rank == 0:
        results.put(
            ("gloo", statistics.median(gloo_times), float("nan"), size * 4 / 2**20, statistics.mean(gloo_cpus))
        )
    dist.destroy_process_group()


def _cpu_steal() -> tuple[int, int]:
    """(steal, total) jiffies of this machine so far, from /proc/stat ((0, 0) where it cannot be read)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(value) for value in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    steal = fields[7] if len(fields) > 7 else 0
    return steal, sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is in user)


def _steal_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else float("nan")


def _variant_reps(kind: str, reps: int, shaped: bool) -> int:
    """Timed rounds of one averager variant: ``--reps``, at least ATHOME_MIN_REPS for athome on loopback."""
    return reps if kind != "athome" or shaped else max(reps, ATHOME_MIN_REPS)


def run_group(n: int, size: int, reps: int, variants=VARIANTS, places=None) -> list[Measurement]:
    ctx = mp.get_context("fork")
    tag = uuid.uuid4().hex[:8]  # fresh averaging prefixes for every run
    maddr_queue, results, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(n, timeout=300)
    port = _free_port()
    places = places or [None] * n
    workers = [
        ctx.Process(
            target=_worker,
            args=(rank, n, size, reps, port, tag, variants, maddr_queue, barrier, results, places[rank]),
        )
        for rank in range(n)
    ]
    for worker in workers:
        worker.start()

    gloo = floor = None
    per_variant: dict[str, list[tuple[int, float, float]]] = {}
    failures: dict[str, list[str]] = {}
    expected = n * sum(_variant_reps(kind, reps, shaped=places[0] is not None) for _, kind, *_ in variants)
    received = 0
    deadline = time.monotonic() + 600
    while (gloo is None or received < expected) and time.monotonic() < deadline:  # gloo's result comes last
        try:
            item = results.get(timeout=5)
        except Exception:
            if not any(w.is_alive() for w in workers):
                break
            continue
        if item[0] == "gloo":
            gloo = Measurement("gloo", item[1], item[2], item[3], item[4])
        elif item[0] == "floor":
            floor = Measurement(FLOOR_LABEL, item[1], float("nan"), size * 4 / 2**20, float("nan"))
        elif item[0] == "fail":
            _, label, rank, error = item
            failures.setdefault(label, []).append(error)
            received += 1
        else:
            _, label, rank, elapsed, ratio, cpu = item
            per_variant.setdefault(label, []).append((rank, elapsed, ratio, cpu))
            received += 1
    for worker in workers:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.kill()

    for label, errors in failures.items():
        print(f"# N={n} {label}: {len(errors)} failed peer-round(s), e.g. {errors[0]}")
    measurements = [m for m in (gloo, floor) if m is not None]
    vector_mib = size * 4 / 2**20
    for label, *_ in variants:
        samples = per_variant.get(label, [])
        if not samples:
            continue
        # per rep: the slowest peer; then the median over reps
        by_rep: dict[int, list[float]] = {}
        counts: dict[int, int] = {}
        for rank, elapsed, *_ in samples:
            rep = counts.get(rank, 0)
            counts[rank] = rep + 1
            by_rep.setdefault(rep, []).append(elapsed)
        seconds = statistics.median(max(values) for values in by_rep.values())
        ratios = [ratio for _, _, ratio, _ in samples if ratio == ratio]
        cpu = statistics.mean(cpu for *_, cpu in samples)
        measurements.append(
            Measurement(label, seconds, statistics.mean(ratios) if ratios else float("nan"), vector_mib, cpu)
        )
    return measurements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000000", help="comma-separated vector sizes (fp32 elements)")
    parser.add_argument("--peers", default="2,4,8", help="comma-separated group sizes")
    parser.add_argument(
        "--reps", type=int, default=1, help="timed all-reduces per variant after the warm-up (median reported)"
    )
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"'all' or comma-separated substrings of variant labels (default: {DEFAULT_VARIANTS!r})",
    )
    parser.add_argument(
        "--link_mbit", type=float, default=None,
        help="put every peer in its own network namespace behind a tc-tbf link of this many Mbit/s (needs root)",
    )
    parser.add_argument(
        "--part_size_bytes", type=int, default=None, help="athome variants only (default: RobustAverager's default)"
    )
    args = parser.parse_args()
    if args.part_size_bytes:
        ATHOME_KWARGS["part_size_bytes"] = args.part_size_bytes
    variants = tuple(
        v for v in VARIANTS if args.variants == "all" or any(key in v[0] for key in args.variants.split(","))
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    peers = [int(p) for p in args.peers.split(",")]

    where = "a process on 127.0.0.1"
    if args.link_mbit:
        where = f"a process in its own network namespace behind a {args.link_mbit:g} Mbit/s tbf link"
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; every peer is {where}")
    started = time.perf_counter()
    summary = link_summary = cpu_summary = None
    bytes_per_value = {"none": 4, "fp16": 2, "uint8": 1}
    codec_of = {label: compression for label, _, _, compression in variants}
    for size in sizes:
        for n in peers:
            steal_before = _cpu_steal()
            if args.link_mbit:
                from athome.testing.netlab import NetLab

                with NetLab() as lab:
                    hosts = [lab.public_host(f"p{rank}") for rank in range(n)]
                    for host in hosts:
                        lab.shape(lab.uplink(host), rate_mbit=args.link_mbit)
                    places = [(h.netns, h.ip, lab.uplink(h).dev_b, hosts[0].ip) for h in hosts]
                    measurements = run_group(n, size, args.reps, variants, places)
            else:
                measurements = run_group(n, size, args.reps, variants)
            steal = _steal_fraction(steal_before, _cpu_steal())
            by_label = {m.label: m for m in measurements}
            gloo = by_label.get("gloo")
            baselines = [m for m in measurements if m.label.startswith("hivemind")]
            hivemind_m = (
                Measurement(
                    "hivemind (mean of runs)",
                    statistics.mean(m.seconds for m in baselines),
                    float("nan"),
                    0,
                    statistics.mean(m.cpu for m in baselines),
                )
                if baselines
                else None
            )
            reps_note = f"median of {args.reps} rep(s)"
            if not args.link_mbit:
                reps_note += f" (on loopback at least {ATHOME_MIN_REPS} for athome, {GLOO_MIN_REPS} per slot for gloo)"
            print(f"\n## N={n}, {size:,} fp32 ({size * 4 / 2**20:.1f} MiB), {reps_note}")
            link_column = f" {'/link':>8}" if args.link_mbit else ""
            print(
                f"{'variant':<28} {'seconds':>8} {'/gloo':>8} {'/hivemind':>10} {'bytes/optimal':>14} "
                f"{'cpu-s/peer':>10} {'cpu/gloo':>9} {'cpu/hivemind':>12}{link_column}"
            )

            def vs_link(m: Measurement) -> float:  # seconds / the time the link allows for this vector as sent
                sent = size * bytes_per_value.get(codec_of.get(m.label, "none"), 4)
                return m.seconds / (2 * (n - 1) / n * sent / (args.link_mbit * 1e6 / 8))

            for m in measurements:
                vs_gloo = m.seconds / gloo.seconds if gloo else float("nan")
                vs_hm = m.seconds / hivemind_m.seconds if hivemind_m else float("nan")
                cpu_gloo = m.cpu / gloo.cpu if gloo else float("nan")
                cpu_hm = m.cpu / hivemind_m.cpu if hivemind_m else float("nan")
                link = f" {vs_link(m):>8.2f}" if args.link_mbit else ""
                print(
                    f"{m.label:<28} {m.seconds:>8.3f} {vs_gloo:>8.2f} {vs_hm:>10.2f} {m.bytes_ratio:>14.3f} "
                    f"{m.cpu:>10.3f} {cpu_gloo:>9.2f} {cpu_hm:>12.2f}{link}"
                )
            if hivemind_m:
                print(f"# /hivemind baseline: mean of {len(baselines)} stock runs, {hivemind_m.seconds:.3f}s")
            if steal == steal:
                # a VM's vCPUs taken by the host's other tenants: gloo's lock-step ring suffers more from it than
                # athome (measured, 4 runs in a row: athome/gloo 2.36 at 2% steal, 1.87 at 8%, 1.42-1.52 at 10-15%)
                print(f"# CPU steal during this group: {100 * steal:.0f}% (the host's other tenants; ratios drift "
                      f"with it, compare runs with little)")
            athome = by_label.get(SUMMARY_VARIANT)
            if athome and gloo and (summary is None or n == 4):  # without the stock runs: athome/hivemind nan
                stock = hivemind_m or Measurement("hivemind (not run)", float("nan"), float("nan"), 0)
                summary = (n, athome.seconds / gloo.seconds, athome.seconds / stock.seconds, athome.bytes_ratio)
                cpu_summary = (n, athome.cpu / gloo.cpu, athome.cpu / stock.cpu)
                if args.link_mbit:
                    link_summary = (n, vs_link(athome), vs_link(gloo))
            sys.stdout.flush()
    print(f"\n# total {time.perf_counter() - started:.0f}s; summary variant: {SUMMARY_VARIANT}")
    if summary is None:
        print("allreduce: no complete measurement")
        sys.exit(1)
    if cpu_summary is not None:  # CPU time is far less sensitive to a loaded box than wall time
        print(f"allreduce_cpu N={cpu_summary[0]} athome/gloo: {cpu_summary[1]:.2f}, athome/hivemind: {cpu_summary[2]:.2f}")
    if link_summary is not None:
        print(f"allreduce_link N={link_summary[0]} athome/link: {link_summary[1]:.2f}, gloo/link: {link_summary[2]:.2f}")
    n, vs_gloo, vs_hivemind, bytes_ratio = summary
    print(
        f"allreduce N={n} athome/gloo: {vs_gloo:.2f}, athome/hivemind: {vs_hivemind:.2f}, "
        f"bytes/optimal: {bytes_ratio:.2f}"
    )


if __name__ == "__main__":
    main()
