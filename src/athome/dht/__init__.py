"""Peer discovery and signed records on hivemind's Kademlia DHT."""
from athome.dht.identity import Identity, IdentityError, peer_id_from_public_key, public_key_from_peer_id
from athome.dht.node import (
    RunAddress,
    RunAddressError,
    RunConfigError,
    fetch_run_config,
    get_records,
    protect_run_keys,
    publish_run_config,
    start_dht,
    store_record,
    withdraw_record,
)
from athome.dht.process import RobustDHT
from athome.dht.records import AthomeRecordValidator, owner_subkey, subkey_owner
