import hashlib
import re

import numpy as np
import pytest

from readmission_platform.lib.routing import canary_rows, parse_share, stable_hash, to_canary

IDS = [f"request-{i}" for i in range(10_000)]


def test_stable_hash_is_the_first_8_bytes_of_blake2b_over_2_to_the_64():
    digest = hashlib.blake2b(b"client-42", digest_size=8).hexdigest()
    assert stable_hash("client-42") == int(digest, 16) / 2**64
    assert all(0.0 <= stable_hash(r) < 1.0 for r in IDS[:1_000])


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.75])
def test_the_canary_takes_its_share_of_10000_requests_within_2_points(share):
    taken = sum(to_canary(r, share) for r in IDS) / len(IDS)
    assert abs(taken - share) <= 0.02, taken


def test_a_request_id_is_routed_alike_every_time_and_a_larger_share_keeps_what_a_smaller_took():
    first = [to_canary(r, 0.25) for r in IDS]
    assert first == [to_canary(r, 0.25) for r in IDS]
    assert canary_rows(IDS, 0.25).tolist() == first
    assert np.all(canary_rows(IDS, 0.5)[np.asarray(first)])
    assert not canary_rows(IDS, 0.0).any() and canary_rows(IDS, 1.0).all()


@pytest.mark.parametrize(("text", "share"), [(None, 0.0), ("", 0.0), ("0", 0.0), ("0.25", 0.25), ("1", 1.0)])
def test_a_share_tag_reads_as_a_number_in_0_1(text, share):
    assert parse_share(text) == share


@pytest.mark.parametrize(("text", "says"), [("a quarter", "not a number"), ("1.5", "outside [0, 1]"), ("nan", "outside")])
def test_a_share_tag_that_is_no_share_is_refused_by_name(text, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_share(text)
