"""The simulated API checks common parameters and signatures as ZEGO does, over a real socket."""

from __future__ import annotations

import aiohttp
import pytest

from exporter.clock import ManualClock
from exporter.simulator.caller import SimCaller
from exporter.simulator.faults import FaultConfig
from exporter.simulator.server import SimulatorServer
from exporter.zego.errors import Code
from exporter.zego.signing import signature
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET, START

BODY = {"TaskId": "AAAAAAAAAAAAAAAA"}



async def test_a_correctly_signed_request_is_answered(caller: SimCaller) -> None:
    answer = await caller.call("DescribeRecordStatus", BODY)
    assert answer["Code"] == Code.TASK_NOT_FOUND  # authenticated: the task simply is not there


async def test_answers_carry_the_zego_envelope(caller: SimCaller) -> None:
    answer = await caller.call("DescribeRecordStatus", BODY)
    assert set(answer) == {"Code", "Message", "RequestId", "Data"}
    assert answer["RequestId"]


async def test_zego_errors_come_with_http_200(caller: SimCaller) -> None:
    async with caller.session.post(caller.url, params=caller.params("DescribeTasks",
                                                                     Signature="0" * 32),
                                   json={}) as response:
        assert response.status == 200
        assert (await response.json())["Code"] == Code.SIGNATURE_ERROR


@pytest.mark.parametrize(("overrides", "code"), [
    ({"Action": None}, Code.ACTION_EMPTY),
    ({"Action": ""}, Code.ACTION_EMPTY),
    ({"Action": "DescribeEverything"}, Code.ACTION_UNSUPPORTED),
    ({"AppId": "12ab"}, Code.APP_ID_FORMAT),
    ({"AppId": None}, Code.APP_ID_FORMAT),
    ({"AppId": "99"}, Code.SECRET_LOOKUP_FAILED),
    ({"Timestamp": None}, Code.TIMESTAMP_EMPTY),
    ({"Timestamp": "soon"}, Code.TIMESTAMP_FORMAT),
    ({"Timestamp": str(int(START) - 601)}, Code.SIGNATURE_EXPIRED),
    ({"Timestamp": str(int(START) + 601)}, Code.SIGNATURE_EXPIRED),
    ({"SignatureNonce": None}, Code.NONCE_EMPTY),
    ({"Signature": None}, Code.SIGNATURE_EMPTY),
    ({"SignatureVersion": None}, Code.SIGNATURE_VERSION_EMPTY),
    ({"SignatureVersion": "1.0"}, Code.SIGNATURE_VERSION_UNSUPPORTED),
    ({"Signature": "0123456789abcdef0123456789abcdef"}, Code.SIGNATURE_ERROR),
])
async def test_each_bad_common_parameter_gets_its_code(
        caller: SimCaller, overrides: dict[str, str | None], code: Code) -> None:
    answer = await caller.call("DescribeRecordStatus", BODY, **overrides)
    assert answer["Code"] == code, answer


async def test_a_signature_made_with_another_secret_is_refused(
        sim: SimulatorServer, clock: ManualClock) -> None:
    async with aiohttp.ClientSession() as session:
        wrong = SimCaller(session, sim.url, APP, "f" * 32, clock)
        assert (await wrong.call("DescribeRecordStatus", BODY))["Code"] == Code.SIGNATURE_ERROR


async def test_a_signature_from_almost_ten_minutes_ago_is_still_valid(caller: SimCaller) -> None:
    timestamp = int(START) - 599
    nonce = "4fd24687296dd9f3"
    answer = await caller.call("DescribeRecordStatus", BODY, Timestamp=str(timestamp),
                               SignatureNonce=nonce,
                               Signature=signature(APP, nonce, SECRET, timestamp))
    assert answer["Code"] == Code.TASK_NOT_FOUND


async def test_a_signature_for_another_timestamp_is_refused(caller: SimCaller) -> None:
    answer = await caller.call("DescribeRecordStatus", BODY, Timestamp=str(int(START) - 5))
    assert answer["Code"] == Code.SIGNATURE_ERROR


async def test_clock_skew_makes_fresh_signatures_expire(
        caller: SimCaller, sim: SimulatorServer) -> None:
    sim.state.set_faults(FaultConfig(clock_skew_s=700))
    assert (await caller.call("DescribeRecordStatus", BODY))["Code"] == Code.SIGNATURE_EXPIRED
    sim.state.set_faults(FaultConfig(clock_skew_s=500))
    assert (await caller.call("DescribeRecordStatus", BODY))["Code"] == Code.TASK_NOT_FOUND


async def test_a_body_that_is_not_json_is_an_invalid_parameter(caller: SimCaller) -> None:
    async with caller.session.post(caller.url, params=caller.params("DescribeTasks"),
                                   data=b"{not json") as response:
        assert (await response.json())["Code"] == Code.INVALID_PARAMETER
