"""Signed, schema-checked DHT records.

Every athome record is a *dictionary entry*: ``key -> {subkey: value}``, where the subkey is the writer's owner
marker ``[athome:<peer id>]``. Because an Ed25519 peer ID embeds its public key, the validator checks the
signature against the subkey alone. The signature covers (key id, subkey, value, expiration), so nobody can
forge a record in another peer's name, bump an old record's expiration, or move it to another key; hivemind's
storage already refuses a record whose expiration is older than the stored one, so replays of older records lose.

Why the subkey and not the key: hivemind hashes keys to DHT ids before validators see them, so an owner marker in
the key cannot be checked by the nodes that store it (a forged overwrite was seen to pass that way on 1.1.12).
The key is still protected: the validator knows the DHT ids of the run's keys (:func:`run_record_keys`) and, for
those, refuses any record without a valid owner subkey (a plain value would otherwise replace the dictionary)
and any value that fails the key's schema. Records of other keys (hivemind's averaging, progress trackers) pass
through untouched unless they carry an athome marker, in which case the signature must hold.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from functools import lru_cache
from typing import Any, Mapping, Optional

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from pydantic import ValidationError

from athome.dht.identity import Identity, verify
from athome.dht.schemas import CONFIG_KEY, MAX_RECORD_BYTES, Record, RunConfigRecord

logger = logging.getLogger(__name__)

_SIGNATURE_MAGIC = b"ATS1"  # athome signature, version 1
_SIGNATURE_BYTES = 64
_MARKER_RE = re.compile(r"^\[athome:([1-9A-HJ-NP-Za-km-z]{40,60})\]$")


def owner_subkey(peer_id: str) -> str:
    """The subkey under which ``peer_id`` writes its own record."""
    return f"[athome:{peer_id}]"


def subkey_owner(subkey: Any) -> Optional[str]:
    """The peer ID named by an owner subkey, or None if the subkey is not an athome marker."""
    if isinstance(subkey, str):
        match = _MARKER_RE.match(subkey)
        if match:
            return match.group(1)
    return None


@lru_cache(maxsize=4096)
def key_id_bytes(key: str) -> bytes:
    """The DHT id bytes hivemind stores ``key`` under (what validators see as ``record.key``)."""
    return DHTID.generate(source=key).to_bytes()


def _signed_message(record: DHTRecord) -> bytes:
    return MSGPackSerializer.dumps([record.key, record.subkey, record.value, record.expiration_time])


class AthomeRecordValidator(RecordValidatorBase):
    """Signs this peer's athome records and accepts only records signed by the owner their subkey names.

    :param private_key: this peer's raw 32-byte Ed25519 private key (None for a validate-only node); kept as bytes
        so the validator pickles into the DHT process (``DHT.add_validators``)
    :param protected: key -> schema of every key that must hold only signed, schema-valid dictionary entries
    """

    def __init__(self, private_key: Optional[bytes], protected: Mapping[str, type[Record]] = ()):
        self._private_key = private_key
        self._identity: Optional[Identity] = None
        self._protected: dict[bytes, tuple[str, type[Record]]] = {}
        self.protect(dict(protected) or {CONFIG_KEY: RunConfigRecord})

    def protect(self, keys: Mapping[str, type[Record]]) -> None:
        for key, schema in keys.items():
            self._protected[key_id_bytes(key)] = (key, schema)

    @property
    def peer_id(self) -> Optional[str]:
        identity = self._get_identity()
        return identity.peer_id if identity is not None else None

    def _get_identity(self) -> Optional[Identity]:
        if self._identity is None and self._private_key is not None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            self._identity = Identity(Ed25519PrivateKey.from_private_bytes(self._private_key), path=None)
        return self._identity

    def __getstate__(self):
        return dict(self.__dict__, _identity=None)

    def validate(self, record: DHTRecord) -> bool:
        protected = self._protected.get(record.key)
        owner = self._owner_of(record.subkey)
        if owner is None:
            if protected is not None:
                logger.debug(f"refused a record without an owner subkey under protected key {protected[0]}")
                return False
            return True  # not an athome record: hivemind's own keys
        if len(record.value) > MAX_RECORD_BYTES + len(_SIGNATURE_MAGIC) + _SIGNATURE_BYTES:
            logger.debug(f"refused an oversize record ({len(record.value)} bytes) from {owner}")
            return False
        if not record.value.startswith(_SIGNATURE_MAGIC):
            logger.debug(f"refused an unsigned record claiming owner {owner}")
            return False
        signature = record.value[len(_SIGNATURE_MAGIC) : len(_SIGNATURE_MAGIC) + _SIGNATURE_BYTES]
        stripped = dataclasses.replace(record, value=self.strip_value(record))
        if not verify(owner, signature, _signed_message(stripped)):
            logger.debug(f"refused a record with a bad signature for owner {owner}")
            return False
        if protected is not None:
            key, schema = protected
            try:
                schema.model_validate(MSGPackSerializer.loads(stripped.value))
            except (ValidationError, ValueError, TypeError) as error:
                logger.debug(f"refused a malformed {schema.__name__} from {owner} under {key}: {error}")
                return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        identity = self._get_identity()
        if identity is None or self._owner_of(record.subkey) != identity.peer_id:
            return record.value
        return _SIGNATURE_MAGIC + identity.sign(_signed_message(record)) + record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        if record.value.startswith(_SIGNATURE_MAGIC) and self._owner_of(record.subkey) is not None:
            return record.value[len(_SIGNATURE_MAGIC) + _SIGNATURE_BYTES :]
        return record.value

    @staticmethod
    def _owner_of(subkey_bytes: Optional[bytes]) -> Optional[str]:
        if not subkey_bytes:
            return None
        try:
            return subkey_owner(MSGPackSerializer.loads(subkey_bytes))
        except Exception:
            return None

    @property
    def priority(self) -> int:
        return 10  # like RSASignatureValidator: check signatures before anything deserializes the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, AthomeRecordValidator):
            return False
        self._protected.update(other._protected)
        if self._private_key is None:
            self._private_key, self._identity = other._private_key, None
        return True
