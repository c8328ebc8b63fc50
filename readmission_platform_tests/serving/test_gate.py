"""The service's edge under a real `bentoml serve .` with a bearer token (`gated_server`): content types, the body cap
and the worker's memory, out-of-scope encounters, what the log holds of refused requests, the token, request ids."""

from __future__ import annotations

import json
import re
import select
import socket
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import httpx
import pytest

from readmission_platform.lib import schema
from readmission_platform.lib.encounter import DEATH_OR_HOSPICE, MAX_BATCH_BYTES, MAX_ENCOUNTER_BYTES, _largest_encounter
from readmission_platform.serving.gate import REFUSAL_LOG_BURST
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform_tests.serving.conftest import TOKEN, logged_once

GOOD = dict(SMOKE_ENCOUNTERS[0])
POSTED = ("/predict", "/predict_batch", "/explain")
PLANTED = "8222157"  # a patient number no log line may hold


def body_of(route: str, *encounters: dict) -> dict:
    return {"encounters": list(encounters)} if route == "/predict_batch" else encounters[0]


def metric(client: httpx.Client, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines() if line.startswith(name))


def memory_kb(pid: int) -> dict[str, int]:
    """The worker's resident memory now (VmRSS) and at its peak (VmHWM), in KB."""
    status = open(f"/proc/{pid}/status").read()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M)[1]) for key in ("VmRSS", "VmHWM")}


def raw_post(url: str, path: str, headers: dict[str, str], chunks: Iterable[bytes]) -> tuple[int, int]:
    """POST `chunks` (chunked, unless headers give a Content-Length) until the server answers; its status and the
    body bytes sent by then."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    chunked = "Content-Length" not in headers
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    head += ["Transfer-Encoding: chunked"] if chunked else []
    sent = 0
    with socket.create_connection((host, port), timeout=60) as connection:
        connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for chunk in chunks:
                if select.select([connection], [], [], 0)[0]:
                    break  # answered already
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
            else:
                connection.sendall(b"0\r\n\r\n" if chunked else b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = connection.recv(4096).decode(errors="replace")
    return int(answer.split(" ", 2)[1]), sent


JSON = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=x", "text/plain", "application/xml",
     "application/x-www-form-urlencoded", None],
)  # fmt: skip
@pytest.mark.parametrize("route", POSTED)
def test_a_body_that_is_not_declared_json_is_a_415(gated_server, route, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    answer = gated_server.client.post(route, content=json.dumps(body_of(route, GOOD)), headers=headers)
    assert answer.status_code == 415, answer.text
    assert "Content-Type: application/json" in answer.json()["error"]
    charset = gated_server.client.post(route, json=body_of(route, GOOD), headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert charset.status_code == 200


@pytest.mark.parametrize("route", POSTED)
def test_a_compressed_body_is_a_415_that_says_so(gated_server, route):
    import gzip

    body = gzip.compress(json.dumps(body_of(route, GOOD)).encode())
    answer = gated_server.client.post(route, content=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert answer.status_code == 415 and "uncompressed" in answer.json()["error"]


def test_a_declared_length_over_the_cap_is_a_413_before_the_body_is_sent(gated_server):
    status, sent = raw_post(gated_server.url, "/predict_batch", JSON | {"Content-Length": str(MAX_BATCH_BYTES + 1)}, [])
    assert status == 413 and sent == 0


@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_one_encounters_routes_take_at_most_what_one_encounter_can_need(gated_server, route):
    # Half a million keys the model refuses: validating them took seconds on the event loop and gigabytes of errors.
    flood = json.dumps({f"x{i}": 1 for i in range(520_000)}).encode()
    assert len(flood) > MAX_ENCOUNTER_BYTES
    status, sent = raw_post(gated_server.url, route, JSON | {"Content-Length": str(len(flood))}, [flood])
    assert status == 413 and sent <= len(flood)
    answer = gated_server.client.post(route, content=flood, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error"] == f"the body is larger than {MAX_ENCOUNTER_BYTES:,} bytes"
    streamed, _ = raw_post(gated_server.url, route, JSON, (flood[i : i + 65_536] for i in range(0, len(flood), 65_536)))
    assert streamed == 413
    # The longest encounter there can be, indented and every character escaped, is read (and judged on its values).
    largest = json.dumps(_largest_encounter(), indent=4, ensure_ascii=True).replace("x", "\\u0078")
    assert len(largest) <= MAX_ENCOUNTER_BYTES
    assert gated_server.client.post(route, content=largest, headers={"Content-Type": "application/json"}).status_code == 400
    assert gated_server.client.post(route, json=GOOD).status_code == 200


def test_batches_of_unknown_keys_are_refused_without_holding_the_workers_memory(gated_server):
    pid = gated_server.client.get("/model").json()["worker_pid"]
    flood = {"encounters": [GOOD | {f"x{i}": 1 for i in range(100_000)}]}  # a megabyte; each key an error
    before = memory_kb(pid)
    for _ in range(5):
        answer = gated_server.client.post("/predict_batch", json=flood)
        assert answer.status_code == 400 and answer.json()["error"].startswith("100000 validation errors")
    after = memory_kb(pid)
    # Hundreds of megabytes a request, kept until a full collection, before unknown keys were counted past the first
    # few and the refusal's traceback cut.
    assert after["VmHWM"] - before["VmHWM"] < 150 << 10 and after["VmRSS"] - before["VmRSS"] < 100 << 10, (before, after)
    assert gated_server.client.post("/predict", json=GOOD).status_code == 200


@pytest.mark.parametrize("body", [GOOD | {f"x{i}": 1 for i in range(1_100)}, {}], ids=["1,100 unknown keys", "empty"])
def test_explain_refuses_a_body_as_predict_does(gated_server, body):
    refused = {route: gated_server.client.post(route, json=body) for route in ("/predict", "/explain")}
    assert refused["/predict"].status_code == refused["/explain"].status_code == 400
    assert refused["/predict"].json() == refused["/explain"].json()
    assert len(refused["/explain"].json()["detail"]) <= 1_000


def test_a_streamed_body_is_counted_a_413_once_past_the_cap_and_the_worker_memory_stays_bounded(gated_server):
    pid = gated_server.client.get("/model").json()["worker_pid"]
    before = memory_kb(pid)
    chunk = b" " * (1 << 20)
    status, sent = raw_post(gated_server.url, "/predict_batch", JSON, (chunk for _ in range(400)))  # 400 MB of padding
    after = memory_kb(pid)
    assert status == 413 and sent < 400 << 20
    # The worker holds at most the cap, not the 400 MB sent; and lets it go.
    assert after["VmHWM"] - before["VmHWM"] < 2 * MAX_BATCH_BYTES // 1024
    assert after["VmRSS"] - before["VmRSS"] < MAX_BATCH_BYTES // 1024
    assert gated_server.client.post("/predict", json=GOOD).status_code == 200


def test_an_out_of_scope_encounter_in_a_batch_is_answered_without_a_probability_and_not_logged(gated_server):
    encounters = [GOOD | {"request_id": "scored-0"}]
    encounters += [GOOD | {"discharge_disposition_id": d, "request_id": f"out-{d}"} for d in schema.DEATH_OR_HOSPICE_DISPOSITIONS]
    encounters += [GOOD | {"request_id": "scored-1"}]
    answer = gated_server.client.post("/predict_batch", json={"encounters": encounters})
    assert answer.status_code == 200, answer.text
    items = answer.json()["predictions"]
    assert [i["request_id"] for i in items] == [e["request_id"] for e in encounters]
    assert items[0]["probability"] == items[-1]["probability"] > 0 and items[0]["reason"] is None
    for item in items[1:-1]:
        assert item == {"probability": None, "decision": None, "risk_band": None, "request_id": item["request_id"],
                        "reason": DEATH_OR_HOSPICE, "model_version": None, "stage": None, "history_used": None}  # fmt: skip
    url = gated_server.settings.prediction_log_url
    logged = logged_once(url, ["request_id"], lambda f: {"scored-0", "scored-1"} <= set(f["request_id"]), "the scored encounters")
    assert not {i["request_id"] for i in items[1:-1]} & set(logged["request_id"])
    none_scored = gated_server.client.post("/predict_batch", json={"encounters": encounters[1:-1]})
    assert {i["reason"] for i in none_scored.json()["predictions"]} == {DEATH_OR_HOSPICE}
    assert gated_server.client.post("/predict_batch", json={"encounters": [GOOD | {"request_id": "after"}]}).status_code == 200
    # The log writer must still be writing after a batch with nothing scored.
    logged_once(url, ["request_id"], lambda f: "after" in set(f["request_id"]), "a row recorded after a batch with nothing scored")


def test_malformed_input_beside_an_out_of_scope_encounter_still_fails_the_batch_naming_the_field(gated_server):
    answer = gated_server.client.post(
        "/predict_batch", json={"encounters": [GOOD | {"discharge_disposition_id": 11}, GOOD | {"age": "old"}]}
    )
    assert answer.status_code == 400 and [d["loc"] for d in answer.json()["detail"]] == [["encounters", 1, "age"]]


@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_one_out_of_scope_encounter_is_a_documented_422_naming_the_reason(gated_server, route):
    answer = gated_server.client.post(route, json=GOOD | {"discharge_disposition_id": 13, "request_id": "hospice-1"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["reason"] == DEATH_OR_HOSPICE and answer.json()["request_id"] == "hospice-1"
    assert "hospice" in answer.json()["error"]
    operation = gated_server.client.get("/docs.json").json()["paths"][route]["post"]
    assert operation["responses"]["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OutOfScope"}
    declared = operation["requestBody"]["content"]["application/json"]["schema"]["properties"]["discharge_disposition_id"]
    assert 13 not in declared["enum"] and "422" in declared["description"]


def test_every_error_answer_is_declared_with_its_body(gated_server):
    paths = gated_server.client.get("/docs.json").json()["paths"]
    for route in POSTED:
        responses = paths[route]["post"]["responses"]
        assert {"200", "400", "401", "405", "413", "415", "503"} <= set(responses) and "404" not in responses
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ValidationErrors"}
        assert paths[route]["post"]["security"] == [{"bearer": []}]
    assert {"200", "401", "405", "503"} <= set(paths["/model"]["get"]["responses"])


@pytest.mark.parametrize(("method", "route", "allowed"), [("GET", "/predict", "POST"), ("PUT", "/explain", "POST"),
                                                         ("POST", "/model", "GET"), ("DELETE", "/model", "GET")])  # fmt: skip
def test_a_method_a_route_does_not_take_is_the_contracts_405(gated_server, method, route, allowed):
    answer = gated_server.client.request(method, route, json={})
    assert answer.status_code == 405 and answer.headers["Allow"] == allowed
    assert answer.json() == {"error": f"{route} takes {allowed}"}


HOSTILE = [
    ("/predict", GOOD | {"patient_nbr": int(PLANTED)}),
    ("/predict", GOOD | {"encounter_id": int(PLANTED), "age": f"[{PLANTED})"}),
    ("/predict", GOOD | {f"name-{PLANTED}": 1, "medical_specialty": f" {PLANTED}"}),
    ("/explain", GOOD | {"num_medications": PLANTED, "request_id": f"{PLANTED}\x1b[31m"}),
    ("/predict_batch", {"encounters": [GOOD, GOOD | {"patient_nbr": int(PLANTED), "diag_1": f"X{PLANTED}"}]}),
    ("/predict_batch", {"encounters": [GOOD | {"payer_code": PLANTED}] * 3}),
    ("/predict", GOOD | {"patient_id": ""}),
]


def test_a_refused_request_is_one_log_line_naming_route_status_fields_and_kinds_and_no_value(gated_server):
    client = gated_server.client
    refusals = len(HOSTILE) + 3
    time.sleep(refusals + 1)  # the log's rate limit gives a line a second: room for each of these, whatever came before
    before = gated_server.log_path.read_text(errors="replace")
    for route, body in HOSTILE:
        assert client.post(route, json=body).status_code == 400
    assert client.post("/predict", content=f'{{"patient_nbr": {PLANTED},', headers={"Content-Type": "application/json"}).status_code == 400
    assert client.post("/predict", content=PLANTED, headers={"Content-Type": f"text/plain; id={PLANTED}"}).status_code == 415
    assert client.get(f"/patients/{PLANTED}").status_code == 404
    assert client.post("/predict", json=GOOD | {"discharge_disposition_id": 11, "request_id": PLANTED}).status_code == 422
    time.sleep(1)
    written = gated_server.log_path.read_text(errors="replace")[len(before) :]
    assert PLANTED not in written and "Traceback" not in written and "input_value" not in written
    assert "\x1b" not in written
    lines = [line for line in written.splitlines() if "refused" in line]
    assert len(lines) == refusals
    assert any("refused /predict 400: patient_nbr (extra_forbidden)" in line for line in lines)
    assert any("(unknown) (extra_forbidden)" in line and "medical_specialty (string_pattern_mismatch)" in line for line in lines)
    assert any("refused /predict_batch 400: encounters.*.payer_code (string_pattern_mismatch) x3" in line for line in lines)
    assert any("refused /predict 422: discharge_disposition_id (death_or_hospice)" in line for line in lines)
    assert any("refused /predict 400: patient_id (string_too_short)" in line for line in lines)  # a field of the request
    assert all("[WARNING]" in line for line in lines)
    assert "path=(not a route)" in written
    assert "path=/predict," in written and "path=/predict_batch," in written and "path=/explain," in written


def test_a_flood_of_refusals_is_logged_at_a_bounded_rate_and_the_rest_counted(gated_server):
    client = gated_server.client
    lines = gated_server.log_path.read_text(errors="replace").count("refused /predict ")
    unlogged = metric(client, "readmission_refusals_unlogged_total")
    started = time.monotonic()
    flood = 3 * REFUSAL_LOG_BURST
    for _ in range(flood):
        client.post("/predict", json=GOOD | {"age": "old"})
    elapsed = time.monotonic() - started
    time.sleep(1)
    logged = gated_server.log_path.read_text(errors="replace").count("refused /predict ") - lines
    counted = metric(client, "readmission_refusals_unlogged_total") - unlogged
    assert logged + counted == flood
    assert logged <= REFUSAL_LOG_BURST + elapsed + 2


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"bEaReR  {TOKEN}"])
def test_the_bearer_scheme_is_case_insensitive(gated_server, header):
    answer = httpx.post(f"{gated_server.url}/predict", json=GOOD, headers={"Authorization": header})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("header", [None, "Bearer", f"Bearer {TOKEN}x", f"Bearer{TOKEN}", f"Basic {TOKEN}", TOKEN])
def test_a_missing_or_wrong_token_is_a_401(gated_server, header):
    answer = httpx.post(f"{gated_server.url}/predict", json=GOOD, headers={"Authorization": header} if header else {})
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("request_id", ["a\x00b", "a\rb", "a\nb", "a\x1b[31mred", "a\x7f", "café", "\u202eevil"])
@pytest.mark.parametrize("route", POSTED)
def test_a_request_id_with_a_character_that_is_not_printable_ascii_is_refused(gated_server, route, request_id):
    answer = gated_server.client.post(route, json=body_of(route, GOOD | {"request_id": request_id}))
    assert answer.status_code == 400, answer.text
    assert [d["loc"][-1] for d in answer.json()["detail"]] == ["request_id"]


def test_a_printable_request_id_is_echoed_and_the_schema_says_which_characters(gated_server):
    printable = "ward 7/bed-3 #42 (~'\"\\)"
    assert gated_server.client.post("/predict", json=GOOD | {"request_id": printable}).json()["request_id"] == printable
    spec = gated_server.client.get("/docs.json").json()
    declared = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert declared["request_id"]["pattern"] == "^[ -~]+$" and declared["request_id"]["nullable"] is True


def test_the_prediction_log_a_worker_makes_is_private_though_the_server_started_under_umask_022(gated_server):
    answer = gated_server.client.post("/predict", json=GOOD | {"request_id": "private-log"})
    assert answer.status_code == 200, answer.text
    log_file = gated_server.settings.home / "predictions.sqlite"
    deadline = time.monotonic() + 30
    while not log_file.exists() and time.monotonic() < deadline:  # made by the worker's log writer, on its first row
        time.sleep(0.2)

    made = list(log_file.parent.glob("predictions.sqlite*"))
    assert log_file in made
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == {p.name: "0o600" for p in made}
