"""The floor of athome's all-reduce design on this machine, next to gloo, in one run.

athome's round is a butterfly: each of N peers reduces 1/N of the vector from every sender's part, returns the
aggregate to every sender, and the averager copies the aggregate into its tensors in one pass at the end (a round
applies atomically). This script runs exactly that data movement with no Python per byte: blocking sockets over
loopback TCP, one thread per socket (they release the GIL), the parts received into one matrix, their mean, the
results received into an output buffer, the final copy. No DHT, no matchmaking, no checks, no CenteredClip. What
athome's rounds cost beyond this (``bench/allreduce.py``) is its own machinery; what this costs beyond gloo is the
design (measured on the 2-core box, N=4, 10M fp32: 1.5x gloo's time and CPU; 1.3x without the final copy).

    python bench/allreduce_floor.py                 # N=4, 10M fp32, 10 reps of each, gloo and the model interleaved
    python bench/allreduce_floor.py --peers 2 --no_final_copy

Last line: ``allreduce_floor N=4 model/gloo: X.XX, cpu: Y.YY``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import threading
import time

import torch
import torch.distributed as dist


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    received = 0
    while received < len(view):
        count = sock.recv_into(view[received:], len(view) - received, socket.MSG_WAITALL)
        if count == 0:
            raise ConnectionError("peer closed the connection mid-round")
        received += count


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.numpy()).cast("B")


def _mesh(rank: int, n: int, ports: list[int]) -> dict[int, socket.socket]:
    """One TCP connection to every other rank (lower ranks listen, higher ranks dial)."""
    server = socket.create_server(("127.0.0.1", ports[rank]), backlog=n)
    dist.barrier()  # every rank listens before anyone dials
    connections = {}
    for other in range(rank):
        sock = socket.create_connection(("127.0.0.1", ports[other]))
        sock.sendall(bytes([rank]))
        connections[other] = sock
    for _ in range(n - 1 - rank):
        sock, _ = server.accept()
        connections[sock.recv(1)[0]] = sock
    server.close()
    for sock in connections.values():  # as athome's data plane tunes its sockets
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return connections


def _all_in_threads(jobs) -> None:
    threads = [threading.Thread(target=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _worker(rank: int, n: int, size: int, reps: int, final_copy: bool, ports: list[int], gloo_port: int, results):
    torch.set_num_threads(1)  # as athome's averager
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank, world_size=n)
    connections = _mesh(rank, n, ports)
    vector = torch.randn(size, generator=torch.Generator().manual_seed(rank))
    tensor, output = vector.clone(), torch.empty(size)
    bounds = [size * i // n for i in range(n + 1)]
    slices = [slice(bounds[i], bounds[i + 1]) for i in range(n)]
    rows = torch.empty(n, bounds[rank + 1] - bounds[rank])

    def butterfly() -> None:
        _all_in_threads(
            [lambda peer=peer: connections[peer].sendall(_bytes(tensor[slices[peer]])) for peer in connections]
            + [lambda peer=peer: _recv_exactly(connections[peer], _bytes(rows[peer])) for peer in connections]
        )
        rows[rank].copy_(tensor[slices[rank]])
        torch.mean(rows, 0, out=output[slices[rank]])
        _all_in_threads(
            [lambda peer=peer: connections[peer].sendall(_bytes(output[slices[rank]])) for peer in connections]
            + [lambda peer=peer: _recv_exactly(connections[peer], _bytes(output[slices[peer]])) for peer in connections]
        )
        if final_copy:
            tensor.copy_(output)

    measured: dict[str, list[tuple[float, float]]] = {"gloo": [], "model": []}
    for name in ("gloo", "model", "gloo", "model"):  # interleaved: the box's speed drifts
        for rep in range(reps + 1):  # rep 0 warms up
            tensor.copy_(vector)
            dist.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
            dist.all_reduce(tensor) if name == "gloo" else butterfly()
            elapsed = torch.tensor([time.perf_counter() - started])
            cpu = torch.tensor([time.process_time() - cpu_started])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            dist.all_reduce(cpu)
            if rep:
                measured[name].append((float(elapsed), float(cpu) / n))
    expected = torch.stack([torch.randn(size, generator=torch.Generator().manual_seed(r)) for r in range(n)]).mean(0)
    if final_copy and not torch.allclose(tensor, expected, atol=1e-5):
        raise AssertionError(f"rank {rank}: the model's result is not the mean")
    if rank == 0:
        results.put({name: values for name, values in measured.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--size", type=int, default=10_000_000, help="fp32 values in the vector")
    parser.add_argument("--reps", type=int, default=10, help="timed rounds per slot (two slots each)")
    parser.add_argument("--no_final_copy", action="store_true", help="leave out the copy into the tensors")
    args = parser.parse_args()

    context = mp.get_context("fork")
    results = context.Queue()
    *ports, gloo_port = _free_ports(args.peers + 1)
    workers = [
        context.Process(
            target=_worker,
            args=(rank, args.peers, args.size, args.reps, not args.no_final_copy, ports, gloo_port, results),
        )
        for rank in range(args.peers)
    ]
    for worker in workers:
        worker.start()
    measured = results.get(timeout=600)
    for worker in workers:
        worker.join()
    print(f"N={args.peers}, {args.size:,} fp32, final copy: {not args.no_final_copy}, median of {2 * args.reps} reps")
    summary = {}
    for name, values in measured.items():
        seconds = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        summary[name] = (seconds, cpu)
        print(f"{name:6} {seconds:.3f} s  {cpu:.3f} cpu-s/peer")
    (model_s, model_cpu), (gloo_s, gloo_cpu) = summary["model"], summary["gloo"]
    print(f"allreduce_floor N={args.peers} model/gloo: {model_s / gloo_s:.2f}, cpu: {model_cpu / gloo_cpu:.2f}")


if __name__ == "__main__":
    main()
