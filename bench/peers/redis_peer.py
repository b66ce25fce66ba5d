"""Redis with one Lua script per payment (EVALSHA), AOF with
`appendfsync always` (Redis writes and fsyncs the AOF before it answers).

Lua numbers are doubles: every amount, balance and product here stays far
below 2**53, where they are exact. The script touches keys it does not
declare, which a single (non-cluster) Redis allows."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

from .common import Run, chunks, free_port, one_at_a_time, stop_process, wait_port
from .workload import FinalState, Payment, Workload, tally

# Keys: bal (hash user -> balance), fee_bps and mbal (hash merchant -> ...),
# stock:<id> (hash kind value cap min_spend budget spent), cstock (hash coupon
# -> stock), unused:<user> (set of the user's unused coupons), used (hash
# coupon -> payment), pay (hash payment id -> "payer:merchant:amount"), fees.
# Returns 0 ok, -1 duplicate, else engine.status.Status of the failure.
PAY_SCRIPT = """
local id, payer, merchant, amount = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local request = payer .. ':' .. merchant .. ':' .. ARGV[4]
local prev = redis.call('HGET', 'pay', id)
if prev then
  if prev == request then return -1 end
  return 9
end
local fee_bps = redis.call('HGET', 'fee_bps', merchant)
if not fee_bps then return 4 end
local balance = redis.call('HGET', 'bal', payer)
if not balance then return 6 end
balance = tonumber(balance)
local best, best_stock, best_d = nil, nil, 0
for _, coupon in ipairs(redis.call('SMEMBERS', 'unused:' .. payer)) do
  local sid = redis.call('HGET', 'cstock', coupon)
  local s = redis.call('HMGET', 'stock:' .. sid, 'kind', 'value', 'cap', 'min_spend',
                       'budget', 'spent')
  local kind, value, cap = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
  local min_spend, budget, spent = tonumber(s[4]), tonumber(s[5]), tonumber(s[6])
  if amount >= min_spend then
    local d
    if kind == 0 then
      d = math.min(value, amount)
    else
      d = math.floor(amount * value / 10000)
      if cap > 0 then d = math.min(d, cap) end
    end
    if d >= 1 and budget - spent >= d then
      local c = tonumber(coupon)
      if d > best_d or (d == best_d and c < tonumber(best)) then
        best, best_stock, best_d = coupon, sid, d
      end
    end
  end
end
local cash = amount - best_d
if balance < cash then return 8 end
local fee = math.floor((amount * tonumber(fee_bps) + 5000) / 10000)
redis.call('HINCRBY', 'bal', payer, 0 - cash)   -- never -0, which HINCRBY refuses
redis.call('HINCRBY', 'mbal', merchant, amount - fee)
redis.call('INCRBY', 'fees', fee)
if best then
  redis.call('HINCRBY', 'stock:' .. best_stock, 'spent', best_d)
  redis.call('SREM', 'unused:' .. payer, best)
  redis.call('HSET', 'used', best, id)
end
redis.call('HSET', 'pay', id, request)
return 0
"""
NAMES = {0: "ok", -1: "duplicate", 6: "payer_not_found", 8: "insufficient_funds"}
PIPELINE = 64
SETUP_CHUNK = 10_000


class Redis:
    """redis-server on 127.0.0.1:<free port>, AOF fsynced on every write."""

    def __init__(self, tmp: str):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: apt-get install -y redis-server "
                               "(bench/peers/README.md)")
        self.dir = os.path.join(tmp, "redis")
        os.makedirs(self.dir)
        self.port = free_port()
        self.log_path = self.dir + ".log"
        cmd = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
               "--appendonly", "yes", "--appendfsync", "always", "--save", "",
               "--daemonize", "no", "--logfile", ""]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port)

    def version(self) -> str:
        return self.client().info("server")["redis_version"]

    def stop(self) -> None:
        stop_process(self.proc)


def setup(r, wl: Workload) -> str:
    r.flushall()
    for part in chunks(list(wl.users.items()), SETUP_CHUNK):
        r.hset("bal", mapping=dict(part))
    r.hset("fee_bps", mapping=wl.merchants)
    r.hset("mbal", mapping=dict.fromkeys(wl.merchants, 0))
    r.set("fees", 0)
    pipe = r.pipeline(transaction=False)
    for s in wl.stocks.values():
        pipe.hset(f"stock:{s.id}", mapping={"kind": s.kind, "value": s.value, "cap": s.cap,
                                            "min_spend": s.min_spend, "budget": s.budget,
                                            "spent": 0})
    for cid, (sid, uid) in wl.coupons.items():
        pipe.hset("cstock", cid, sid)
        pipe.sadd(f"unused:{uid}", cid)
    pipe.execute()
    return r.script_load(PAY_SCRIPT)


def final_state(r, outcomes: dict) -> FinalState:
    ints = lambda h: {int(k): int(v) for k, v in r.hgetall(h).items()}  # noqa: E731
    spent = {}
    for key in r.scan_iter("stock:*", count=1000):
        spent[int(key.split(b":")[1])] = int(r.hget(key, "spent"))
    return FinalState(ints("bal"), ints("mbal"), spent, ints("used"), int(r.get("fees")),
                      outcomes)


async def _pipelined(port: int, sha: str, lanes: list[list[Payment]], clock):
    """One connection per lane, pipelines of PIPELINE EVALSHAs in lane order."""
    import redis.asyncio as aredis
    clients = [aredis.Redis(host="127.0.0.1", port=port) for _ in lanes]
    latencies: list[float] = []

    async def lane_task(client, lane):
        names = []
        for part in chunks(lane, PIPELINE):
            pipe = client.pipeline(transaction=False)
            for p in part:
                pipe.evalsha(sha, 0, p.id, p.payer, p.merchant, p.amount)
            t0 = clock()
            codes = await pipe.execute()
            latencies.append(clock() - t0)
            names += [NAMES[c] for c in codes]
        return names
    try:
        for client in clients:
            await client.ping()
        started = clock()
        results = await asyncio.gather(*(lane_task(c, lane) for c, lane in zip(clients, lanes)))
        seconds = clock() - started
    finally:
        for client in clients:
            await client.aclose()
    return [n for names in results for n in names], seconds, latencies


def run(server: Redis, wl: Workload, payments: list[Payment], *, callers: int, clock) -> Run:
    import uvloop
    r = server.client()
    sha = setup(r, wl)
    if callers > 1:
        lanes = wl.lanes(callers, payments)
        names, seconds, latencies = uvloop.run(_pipelined(server.port, sha, lanes, clock))
        how = f"EVALSHA, {callers} connections, pipelines of {PIPELINE}"
        latency_of = f"pipeline of {PIPELINE}"
    else:
        def pay_one(p: Payment) -> str:
            return NAMES[r.evalsha(sha, 0, p.id, p.payer, p.merchant, p.amount)]
        started = clock()
        names, latencies = one_at_a_time(pay_one, payments, clock)
        seconds = clock() - started
        how, latency_of = "EVALSHA, 1 connection, one at a time", "payment"
    state = final_state(r, tally(names))
    r.close()
    return Run(f"Redis {server.version()} + Lua", "many" if callers > 1 else "one", how,
               len(payments), seconds, latencies, latency_of, state)
