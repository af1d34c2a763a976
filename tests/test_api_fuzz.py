"""Property-based fuzzing (hypothesis) of the HTTP API's inputs, as tests/test_fuzz.py fuzzes
the other parsers: a client's user ids and their stored form, webhook URLs and signature
headers, and the routes themselves (JSON bodies, path ids, multipart photos) through the real
app on the real moto server.

The property, for each: a valid value, or the documented error naming the field (an HTTP 4xx
with ``{"error", "client_fault": true}``); never a 500, never another exception.
"""

from __future__ import annotations

import ipaddress
import json
import string

import pytest
from fastapi.testclient import TestClient
from fixtures.cloud import echo
from fixtures.lanes import examples
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from avatarforge.api import ApiConfig, ApiService, create_app, hash_key, new_key, sign, verify
from avatarforge.api.tenancy import MAX_ID_LENGTH, internal_user, owns
from avatarforge.api.webhooks import SignatureError, WebhookUrlError, check_url
from avatarforge.names import InvalidNameError, check_user_id

KEY = new_key()
ID_CHARS = string.ascii_letters + string.digits + "_-"
FUNCTION_FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

users = st.one_of(
    st.text(alphabet=ID_CHARS, min_size=1, max_size=70),
    st.text(max_size=80),
)
namespaces = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=12)


@settings(max_examples=examples(400), deadline=None)
@given(namespaces, users, namespaces, users)
@example("ab", "c-d", "a", "bc-d")
@example("a", "x" * 63, "a", "x" * 62 + "y")
def test_stored_user_ids_follow_the_rule_and_never_meet(ns1, user1, ns2, user2) -> None:
    stored = []
    for ns, user in ((ns1, user1), (ns2, user2)):
        try:
            stored.append(internal_user(ns, user))
        except InvalidNameError as exc:
            assert "user" in str(exc)
            with pytest.raises(InvalidNameError):
                check_user_id(user)  # refused only where the CLI refuses it too
            return
    for (ns, _), name in zip(((ns1, user1), (ns2, user2)), stored, strict=True):
        assert check_user_id(name) and len(name) <= MAX_ID_LENGTH and owns(ns, name)
    if (ns1, user1) != (ns2, user2):
        assert stored[0] != stored[1]


def _address() -> st.SearchStrategy[str]:
    v4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
    v6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
    return st.one_of(v4, v6)


@settings(max_examples=examples(400), deadline=None)
@given(
    st.one_of(
        st.text(max_size=60),
        st.builds(
            lambda scheme, host, rest: f"{scheme}://{host}{rest}",
            st.sampled_from(["http", "https", "ftp", "HTTP", "file", ""]),
            st.text(max_size=30),
            st.text(max_size=20),
        ),
    ),
    st.lists(_address(), max_size=3),
    st.booleans(),
)
@example("http://[::ffff:127.0.0.1]/", ["::ffff:127.0.0.1"], False)
@example("http://x:99999/", ["1.1.1.1"], False)
def test_webhook_urls_are_checked_or_refused_naming_the_field(url, addresses, private) -> None:
    def resolver(host, port):
        if not addresses:
            raise OSError("no such host")
        return addresses

    try:
        found = check_url(url, allow_private=private, resolver=resolver)
    except WebhookUrlError as exc:
        assert str(exc).startswith("webhook_url: ")
        return
    assert found.scheme in ("http", "https") and 0 < found.port < 65536
    if not private:
        for address in found.addresses:
            ip = ipaddress.ip_address(address)
            ip = getattr(ip, "ipv4_mapped", None) or ip
            assert ip.is_global and not ip.is_multicast


@settings(max_examples=examples(300), deadline=None)
@given(st.one_of(st.none(), st.text(max_size=120)), st.binary(max_size=64))
@example("t=1,v1=00", b"{}")
@example("t=99999999999999999999999,v1=", b"")
def test_signature_headers_verify_or_are_refused(header, body) -> None:
    secret = b"k" * 32
    try:
        verify(secret, header, body)
    except SignatureError as exc:
        assert "Avatarforge-Signature" in str(exc)
    good = sign(secret, body, 1_700_000_000)
    assert verify(secret, good, body, now=1_700_000_100) == 1_700_000_000


# ------------------------------------------------------------------------------ the routes


@pytest.fixture
def client(cloud_config, start_runtime, monkeypatch) -> TestClient:
    """The app on moto, with the deployment's training endpoint on the local runtime and no
    multi-model endpoint (every user is without a model)."""
    start_runtime(echo)
    monkeypatch.setenv("AVATARFORGE_API_WEBHOOK_SECRET", "x" * 40)
    keys = [{"name": "fuzz", "sha256": hash_key(KEY), "namespace": "fuzz"}]
    config = ApiConfig.from_dict({"keys": keys, "rate_per_minute": 100000, "burst": 100000})
    return TestClient(create_app(ApiService(cloud_config, config), watch=False))


json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
training_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"user": st.one_of(users, json_values)},
        optional={
            "preset": st.one_of(st.sampled_from(["default", "x"]), json_values),
            "webhook_url": st.one_of(st.text(max_size=40), json_values),
            "extra": json_values,
        },
    ),
)
prediction_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"user": st.one_of(users, json_values)},
        optional={
            "prompt": st.one_of(st.text(max_size=40), json_values),
            "pack": st.one_of(st.sampled_from(["classic", "nope"]), json_values),
            "gen_args": st.one_of(
                st.dictionaries(
                    st.sampled_from(["steps", "seed", "height", "stepz", "num_images"]),
                    json_values,
                    max_size=3,
                ),
                json_values,
            ),
        },
    ),
)


def _refused_well(answer) -> None:
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        body = answer.json()
        assert body["client_fault"] is True and isinstance(body["error"], str) and body["error"]


@settings(max_examples=examples(150), deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(training_bodies)
@example({"user": "alice", "preset": "default"})  # valid, but no photos: a 400
def test_training_bodies_are_answered_4xx_naming_the_field(client, body) -> None:
    answer = client.post(
        "/v1/trainings",
        content=json.dumps(body, allow_nan=True),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    _refused_well(answer)
    assert answer.status_code != 202  # no user of these has photos


@settings(max_examples=examples(150), deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(prediction_bodies)
def test_prediction_bodies_are_answered_4xx_naming_the_field(client, body) -> None:
    answer = client.post(
        "/v1/predictions",
        content=json.dumps(body, allow_nan=True),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    _refused_well(answer)
    assert answer.status_code != 200  # no model exists
    if answer.status_code == 404:
        assert "has no model yet" in answer.json()["error"]


@settings(max_examples=examples(150), deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(st.text(alphabet=ID_CHARS + "./%~ é", min_size=1, max_size=70))
def test_ids_in_paths_are_answered_without_a_500(client, name) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    for path in (f"/v1/users/{name}/photos", f"/v1/trainings/{name}"):
        _refused_well(client.get(path, headers=headers))


@settings(max_examples=examples(100), deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(st.lists(st.tuples(st.text(max_size=30), st.binary(max_size=300)), min_size=1, max_size=3))
def test_uploaded_bytes_are_stored_or_refused_with_a_reason(client, files) -> None:
    answer = client.post(
        "/v1/users/fuzzed/photos",
        files=[("photos", (name or "x", data, "image/jpeg")) for name, data in files],
        headers={"Authorization": f"Bearer {KEY}"},
    )
    _refused_well(answer)
    assert answer.status_code == 400  # a few hundred bytes are never a usable photo
    assert answer.json()["error"].startswith("photos: none is usable: ")
