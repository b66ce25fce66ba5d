"""A small program that uses Scanpay's public API, checked by
`mypy --strict` (tests/test_api.py::test_typed_program_passes_mypy_strict).
It is type-checked, not run: it shows what a typed caller writes."""
from __future__ import annotations

import asyncio

import numpy as np

import engine
from engine import (PAY_RECORD, PAY_RESULT, AsyncClient, BadBody, Client, Engine, EngineError,
                    ErrorCode, Status)


def embedded() -> str:
    with Engine() as eng:
        reply: dict[str, object] = eng.call("WALLETS", {"users": [1]})
        assert reply["results"]
        records = np.zeros(2, PAY_RECORD)
        records["id"], records["payer"], records["merchant"], records["amount"] = [1, 2], 1, 7, 300
        results: np.ndarray = eng.pay(records)
        assert results.dtype == PAY_RESULT
        ok = int((results["status"] == Status.ok).sum())
        try:
            eng.call("MERCHANTS", {"merchants": "not a list"})
        except BadBody as e:
            assert e.code == ErrorCode.bad_body
        counts: dict[str, int] = eng.counts()
        return f"{ok} paid of {counts['payments']}; digest {eng.digest()[:8]}"


def blocking(port: int) -> bool:
    with Client.connect("127.0.0.1", port, timeout_ms=5_000) as client:
        paid = client.pay_one(id=3, payer=1, merchant=7, amount=300, coupons=(11,))
        balances = client.call("BALANCES", {"users": [1]})
        return paid.ok and paid.cash >= 0 and bool(balances)


async def pipelined(port: int) -> list[int]:
    client: AsyncClient = await AsyncClient.connect("127.0.0.1", port)
    async with client:
        paid = await asyncio.gather(*(client.pay_one(id=i, payer=1, merchant=7, amount=100)
                                      for i in range(10, 20)))
        issued = await client.issue_one(coupon=99, stock=5, user=1)
        names: list[str] = [p.status_name for p in paid] + [issued.status_name]
        assert all(isinstance(n, str) for n in names)
        return [p.status for p in paid if not p.duplicate]


async def following_the_leader(ports: list[int]) -> int:
    """Several servers: the client follows the leader and retries."""
    from engine.client import OutcomeUnknown, RetryDeadlineExceeded
    addresses = [f"127.0.0.1:{port}" for port in ports]
    client: AsyncClient = await AsyncClient.connect(addresses, retry_deadline_ms=5_000,
                                                    backoff_initial_ms=20, backoff_max_ms=500)
    async with client:
        try:
            paid = await client.pay_one(id=30, payer=1, merchant=7, amount=100)
            code: dict[str, object] = await client.call("PAYMENT_CODE", {"user": 1})
            assert code
        except OutcomeUnknown as e:
            print(f"read the state first: {e.op} {e.cause}")
            return -1
        except RetryDeadlineExceeded as e:
            print(f"gave up after {e.attempts}: {e.last_error}")
            return -1
    with Client.connect(",".join(addresses), retry_deadline_ms=5_000) as blocking_client:
        again = blocking_client.pay_one(id=30, payer=1, merchant=7, amount=100)
    return paid.status if not again.duplicate else again.status


def main() -> None:
    print(engine.__version__, embedded())
    try:
        print(blocking(7411), asyncio.run(pipelined(7411)))
    except (EngineError, ConnectionError) as e:
        print(f"no server: {e}")


if __name__ == "__main__":
    main()
