"""A peer's one identity: an Ed25519 key that is both its libp2p identity and the key that signs its DHT records.

The key file is libp2p's ``crypto.pb.PrivateKey`` protobuf (key_type Ed25519), which p2pd loads directly, so the
peer ID (``12D3KooW...``) *embeds* the public key: anyone holding a peer ID can verify that peer's signatures with
no extra key exchange. This is what lets ``--run /ip4/.../p2p/<coordinator id>`` alone authenticate a run config.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.proto import crypto_pb2

logger = logging.getLogger(__name__)

DEFAULT_IDENTITY_DIR = Path(os.environ.get("ATHOME_HOME", Path.home() / ".athome"))
_IDENTITY_MULTIHASH = b"\x00"  # multihash code 0x00 'identity': keys up to 42 bytes are inlined in the peer ID


class IdentityError(ValueError):
    """The identity file or a peer ID cannot be used; the message says how to fix it."""


def _public_key_protobuf(raw_public_key: bytes) -> bytes:
    return crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=raw_public_key).SerializeToString()


def peer_id_from_public_key(raw_public_key: bytes) -> str:
    """The libp2p peer ID (base58) of an Ed25519 public key: multihash-identity of the protobuf-encoded key."""
    encoded = _public_key_protobuf(raw_public_key)
    return base58.b58encode(_IDENTITY_MULTIHASH + bytes([len(encoded)]) + encoded).decode()


def public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    """Extract the Ed25519 public key embedded in a ``12D3KooW...`` peer ID.

    Raises IdentityError for peer IDs that do not embed an Ed25519 key (e.g. RSA ``Qm...`` IDs, which are hashes).
    """
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as error:
        raise IdentityError(f"peer ID {peer_id!r} is not base58: {error}") from None
    if len(raw) < 2 or raw[:1] != _IDENTITY_MULTIHASH or raw[1] != len(raw) - 2:
        raise IdentityError(f"peer ID {peer_id[:16]!r}... does not embed a public key (only Ed25519 IDs do)")
    try:
        key = crypto_pb2.PublicKey.FromString(raw[2:])
    except Exception as error:  # protobuf raises its own DecodeError
        raise IdentityError(f"peer ID {peer_id[:16]!r}... holds a malformed public key: {error}") from None
    if key.key_type != crypto_pb2.KeyType.Ed25519 or len(key.data) != 32:
        raise IdentityError(f"peer ID {peer_id[:16]!r}... is not an Ed25519 identity")
    return Ed25519PublicKey.from_public_bytes(key.data)


def verify(peer_id: str, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` over ``message`` was made by the key embedded in ``peer_id``."""
    try:
        public_key_from_peer_id(peer_id).verify(signature, message)
        return True
    except (InvalidSignature, IdentityError, ValueError):
        return False


@dataclass(frozen=True)
class Identity:
    """An Ed25519 private key with its libp2p peer ID; ``path`` is the libp2p key file p2pd is started with."""

    private_key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def raw_public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.raw_public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @classmethod
    def load_or_create(cls, path: str | Path | None = None) -> "Identity":
        """Load the identity at ``path`` (default ``~/.athome/identity.key``), creating it with mode 0600 if absent."""
        path = Path(path) if path is not None else DEFAULT_IDENTITY_DIR / "identity.key"
        if path.exists():
            return cls(_read_private_key(path), path)
        path.parent.mkdir(parents=True, exist_ok=True)
        private_key = Ed25519PrivateKey.generate()
        raw_private = private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        raw_public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        # libp2p's Ed25519 private key encoding is the 32-byte seed followed by the 32-byte public key
        blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=raw_private + raw_public)
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(blob.SerializeToString())
        os.replace(tmp, path)
        identity = cls(private_key, path)
        logger.info(f"Created a new identity {identity.peer_id} in {path} (reuse it with --identity_path {path})")
        return identity


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        blob = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    except OSError as error:
        raise IdentityError(f"cannot read identity {path}: {error.strerror}") from None
    except Exception:
        raise IdentityError(f"{path} is not a libp2p private key file; move it away to create a new identity") from None
    if blob.key_type != crypto_pb2.KeyType.Ed25519:
        raise IdentityError(
            f"{path} holds a {crypto_pb2.KeyType.Name(blob.key_type)} key, but athome identities are Ed25519 "
            f"(hivemind writes RSA keys); point --identity_path at a new file to create one"
        )
    if len(blob.data) not in (32, 64):
        raise IdentityError(f"{path}: Ed25519 key has {len(blob.data)} bytes, expected 64")
    return Ed25519PrivateKey.from_private_bytes(blob.data[:32])
