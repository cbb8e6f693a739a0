"""Finding the swarm again after a restart: remember connected peers' addresses, dial them on start-up.

A restarted coordinator starts a fresh DHT node, and nobody dials it: the other peers dropped it from their
routing tables when it died, and p2pd refuses to start with bootstrap peers it cannot reach (so peers that may have
left cannot simply be passed as ``initial_peers``). :func:`remember_peers` writes the addresses of the peers this
node is connected to into a file; :func:`rejoin` dials the saved ones after start-up and pings them through the
DHT protocol, which puts both sides back into each other's routing tables.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import List

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)
MAX_REMEMBERED = 64


async def _connected_maddrs(dht: hivemind.DHT, node) -> List[str]:
    own = node.p2p.peer_id
    found = []
    for info in await node.p2p.list_peers():
        if info.peer_id != own:
            found += [f"{addr}/p2p/{info.peer_id.to_base58()}" for addr in info.addrs if "/p2p-circuit" not in str(addr)]
    return found


def remember_peers(dht: hivemind.DHT, path: Path) -> int:
    """Save the addresses of the peers ``dht`` is connected to (at most 64), atomically; returns how many."""
    maddrs = dht.run_coroutine(_connected_maddrs)[:MAX_REMEMBERED]
    if maddrs:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(path).with_suffix(".tmp")
        temporary.write_text(json.dumps(maddrs))
        os.replace(temporary, path)
    return len(maddrs)


async def _dial_and_ping(dht: hivemind.DHT, node, maddrs: List[str], timeout: float) -> int:
    async def one(maddr: str) -> bool:
        try:
            address = Multiaddr(maddr)
            peer_id = PeerID.from_base58(address.value_for_protocol("p2p"))
            transport = Multiaddr(maddr.rsplit("/p2p/", 1)[0])
            await asyncio.wait_for(node.p2p._client.connect(peer_id, [transport]), timeout)
            return await node.protocol.call_ping(peer_id, validate=False, strict=False) is not None
        except Exception as error:  # gone, moved or never reachable: the others may still answer
            logger.debug(f"rejoin: {maddr} did not answer: {error!r}")
            return False

    return sum(await asyncio.gather(*map(one, maddrs)))


def rejoin(dht: hivemind.DHT, path: Path, timeout: float = 10.0) -> int:
    """Dial the peers saved in ``path`` and add the ones that answer to the routing table; returns how many."""
    try:
        maddrs = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(maddrs, list):
        return 0
    maddrs = [m for m in maddrs if isinstance(m, str) and "/p2p/" in m][:MAX_REMEMBERED]
    return dht.run_coroutine(partial(_dial_and_ping, maddrs=maddrs, timeout=timeout)) if maddrs else 0
