"""Fuzzing athome's record validator: arbitrary bytes never crash it, and any tampering is refused."""
from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

from athome.dht import Identity, owner_subkey
from athome.dht.node import _raw_private_key
from athome.dht.records import AthomeRecordValidator, key_id_bytes
from athome.dht.schemas import MetricsRecord, run_record_keys

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEY = "athome.demo.metrics"


def _signed_record(identity: Identity, validator: AthomeRecordValidator) -> DHTRecord:
    body = MetricsRecord(step=3, loss=1.5, samples=48, samples_per_second=9.0, time=time.time()).model_dump()
    record = DHTRecord(
        key_id_bytes(KEY), MSGPackSerializer.dumps(owner_subkey(identity.peer_id)), MSGPackSerializer.dumps(body),
        expiration_time=time.time() + 60,
    )
    return DHTRecord(record.key, record.subkey, validator.sign_value(record), record.expiration_time)


def _validator(tmp_path) -> tuple[Identity, AthomeRecordValidator]:
    identity = Identity.load_or_create(tmp_path / "id.key")
    return identity, AthomeRecordValidator(_raw_private_key(identity), run_record_keys("demo"))


@FUZZ
@given(key=st.binary(max_size=40), subkey=st.binary(max_size=80), value=st.binary(max_size=300),
       expiration=st.floats(allow_nan=True, allow_infinity=True))
def test_arbitrary_bytes_never_crash_the_validator(tmp_path_factory, key, subkey, value, expiration):
    _, validator = _validator(tmp_path_factory.mktemp("v"))
    assert validator.validate(DHTRecord(key, subkey, value, expiration)) in (True, False)
    protected = DHTRecord(key_id_bytes(KEY), subkey, value, expiration)
    assert validator.validate(protected) is False  # random bytes are never a valid signed record


@FUZZ
@given(data=st.data())
def test_any_tampering_with_a_signed_record_is_refused(tmp_path_factory, data):
    identity, validator = _validator(tmp_path_factory.mktemp("v"))
    record = _signed_record(identity, validator)
    assert validator.validate(record)
    field = data.draw(st.sampled_from(["value", "subkey", "expiration_time", "key"]))
    if field == "expiration_time":
        tampered = DHTRecord(record.key, record.subkey, record.value,
                             record.expiration_time + data.draw(st.floats(min_value=0.001, max_value=1e6)))
    else:
        original = getattr(record, field)
        position = data.draw(st.integers(0, len(original) - 1))
        flipped = bytes([original[position] ^ data.draw(st.integers(1, 255))])
        mutated = original[:position] + flipped + original[position + 1 :]
        tampered = DHTRecord(**{**record.__dict__, field: mutated})
    assert validator.validate(tampered) is False


@FUZZ
@given(body=st.dictionaries(st.text(max_size=12), st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=20),
                                                             st.none(), st.booleans()), max_size=8))
def test_signed_but_malformed_values_are_refused(tmp_path_factory, body):
    identity, validator = _validator(tmp_path_factory.mktemp("v"))
    record = DHTRecord(key_id_bytes(KEY), MSGPackSerializer.dumps(owner_subkey(identity.peer_id)),
                       MSGPackSerializer.dumps(body), time.time() + 60)
    signed = DHTRecord(record.key, record.subkey, validator.sign_value(record), record.expiration_time)
    try:
        MetricsRecord.model_validate(body)
        well_formed = True
    except Exception:
        well_formed = False
    assert validator.validate(signed) is well_formed
