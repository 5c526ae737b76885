"""Request signatures match ZEGO's documented algorithm and test vector."""

from __future__ import annotations

import re

from exporter.zego.signing import common_params, signature


def test_zego_documented_test_vector() -> None:
    assert (
        signature(12345, "4fd24687296dd9f3", "9193cc662a4c0ec135ec71fb57194b38", 1615186943)
        == "43e5cfcca828314675f91b001390566a"
    )


def test_every_request_gets_a_fresh_16_hex_nonce_and_second_timestamp() -> None:
    first = common_params("DescribeTasks", 12345, "secret", 1615186943.9)
    second = common_params("DescribeTasks", 12345, "secret", 1615186943.9)
    assert re.fullmatch(r"[0-9a-f]{16}", first["SignatureNonce"])
    assert first["SignatureNonce"] != second["SignatureNonce"]
    assert first["Timestamp"] == "1615186943"
    assert first["SignatureVersion"] == "2.0"
    assert first["Signature"] == signature(12345, first["SignatureNonce"], "secret", 1615186943)


def test_common_params_never_carry_the_secret() -> None:
    params = common_params("DescribeTasks", 12345, "s3cr3t-DO-NOT-LEAK", 1615186943)
    assert not any("s3cr3t" in value for value in params.values())
