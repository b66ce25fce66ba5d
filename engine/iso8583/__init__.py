"""`scanpay iso8583`: an ISO 8583 adapter in front of a Scanpay server.

Acquirers, card switches and POS back ends keep long-lived TCP links and
send length-prefixed ISO 8583 messages; this adapter accepts those links,
decodes each message with pyiso8583 (field spec from the config), turns it
into a Scanpay operation through the Python client (engine/client/__init__.py, one
pipelined connection whose concurrent PAYs share frames), and answers with
the response MTI. The mapping itself is engine/iso8583/mapping.py; usage, tables
and limits are docs/iso8583.md.

Many messages may be in flight on one link; each is answered when its
operation completes, in any order, carrying the request's STAN (DE11) and
terminal (DE41) so that the sender matches replies as jPOS's QMUX does.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
import sys
import time

import iso8583

from engine.iso8583 import mapping as m
from engine.client import AsyncClient, ConnectionLost, parse_address
from engine.protocol.errors import Busy, EngineError, Forbidden, Unavailable
from engine.protocol.status import Status

log = logging.getLogger("scanpay.iso8583")
LENGTH_BINARY2 = struct.Struct(">H")
FRAMES_PER_READ_MAX = 4096          # frames parsed per data_received before yielding
STOP_GRACE_S = 5.0
RECONNECT_PAUSE_S = 0.5             # after a failed connect to the engine
WRITE_BUFFER_BYTES_MAX = 256 << 10  # replies the peer has not read; then the link is not read
MTI_UNREADABLE = "????"


class EngineUnavailable(Exception):
    """No answer from the engine (down, busy, timed out): DE39 91, retryable."""


class Declined(Exception):
    """Refused by the adapter before the engine applies anything."""

    def __init__(self, response_code: str):
        super().__init__(response_code)
        self.response_code = response_code


class RefusedByEngine(Exception):
    """The engine refused the request whole: DE39 carries `response_code`."""

    def __init__(self, response_code: str, message: str):
        super().__init__(message)
        self.response_code = response_code


# -- framing ------------------------------------------------------------------------

def frame_prefix(framing: str, size: int) -> bytes:
    if framing == "binary2":
        return LENGTH_BINARY2.pack(size)
    return b"%04d" % size


def frame_size(framing: str, header: bytes) -> int | None:
    """The message length a frame header announces; None if it is not a length."""
    if framing == "binary2":
        return LENGTH_BINARY2.unpack(header)[0]
    return int(header) if header.isdigit() else None


def header_bytes(framing: str) -> int:
    return 2 if framing == "binary2" else 4


# -- the engine side --------------------------------------------------------------------

class EngineLink:
    """One pipelined client connection to the Scanpay server, reopened on demand."""

    def __init__(self, config: m.IsoConfig):
        self.config = config
        self.host, self.port = parse_address(config.engine)
        self.client: AsyncClient | None = None
        self.currency = config.currency     # DE49 numeric, "" until known
        self._opening = asyncio.Lock()
        self.retry_at = 0.0                 # monotonic: no connect attempt before this
        self.last_error = None              # makes the exception of the last failed connect

    async def get(self) -> AsyncClient:
        if self.client is not None:
            return self.client
        async with self._opening:
            if self.client is None:
                # After a failed attempt, fail fast for a moment: messages
                # queued here would otherwise each wait a full connect timeout.
                if time.monotonic() < self.retry_at:
                    raise self.last_error()     # the same answer as the failed attempt
                try:
                    self.client = await AsyncClient.connect(
                        self.host, self.port, key_id=self.config.engine_key_id or None,
                        secret=self.config.engine_secret or None,
                        timeout_ms=self.config.engine_timeout_ms,
                        client_name="scanpay-iso8583/0.1")
                except (OSError, TimeoutError, EngineError) as e:
                    self.retry_at = time.monotonic() + RECONNECT_PAUSE_S
                    self.last_error = self.classify(e)
                    raise self.last_error() from None
                self.learn_currency(self.client.server_info.currency)
        return self.client

    def classify(self, error: BaseException):
        """What a failed connect means: the engine is away (91), or the
        adapter is refused, e.g. a wrong key (96), which retrying won't cure."""
        text = f"cannot connect to the engine at {self.config.engine}: {error}"
        if isinstance(error, (OSError, TimeoutError, Busy, Unavailable)) or getattr(
                error, "retryable", False):
            return lambda: EngineUnavailable(text)
        return lambda: RefusedByEngine(m.RC_SYSTEM_ERROR, text)

    def learn_currency(self, alpha: str) -> None:
        if self.config.currency:
            return
        self.currency = m.CURRENCY_NUMERIC.get(alpha, "")
        if not self.currency:
            log.error("the engine's currency %r has no known ISO 4217 number: set `currency` "
                      "in [iso8583]", alpha)

    async def run(self, call):
        """`await call(client)`, with engine failures as EngineUnavailable/RefusedByEngine."""
        client = None
        try:
            client = await self.get()
            return await call(client)
        except (ConnectionLost, OSError) as e:
            if client is not None:
                self.drop(client)
            raise EngineUnavailable(f"no connection to the engine at {self.config.engine}: "
                                    f"{e}") from None
        except (TimeoutError, Busy, Unavailable) as e:
            raise EngineUnavailable(str(e) or type(e).__name__) from None
        except Forbidden as e:
            raise RefusedByEngine(m.RC_NOT_PERMITTED, str(e)) from None
        except EngineError as e:
            if getattr(e, "retryable", False):
                raise EngineUnavailable(str(e)) from None
            raise RefusedByEngine(m.RC_SYSTEM_ERROR, f"{type(e).__name__}: {e}") from None

    def drop(self, client: AsyncClient) -> None:
        if self.client is client:
            self.client = None
        client.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


# -- metrics ----------------------------------------------------------------------------

class IsoMetrics:
    """Messages by request MTI and DE39, links, and links closed by reason.

    Kept as plain counters (tests and the exit log read them) and, with
    `metrics = "host:port"`, also served in Prometheus format."""

    def __init__(self):
        self.messages = collections.Counter()     # (mti, de39) -> count
        self.closed = collections.Counter()       # reason -> links
        self.links = 0
        self._prometheus = None

    def register(self, registry) -> None:
        """Export the counters in a Prometheus registry (the adapter's own, or
        the server's when it runs inside `scanpay serve`); before start."""
        from prometheus_client import Counter, Gauge
        self._prometheus = (
            Counter("scanpay_iso8583_messages", "ISO 8583 messages answered, by request MTI "
                    "and response code (DE39)", ["mti", "response_code"], registry=registry),
            Counter("scanpay_iso8583_links_closed", "links closed by the adapter or the peer, "
                    "by reason", ["reason"], registry=registry),
            Gauge("scanpay_iso8583_links", "open ISO 8583 links", registry=registry))

    def serve(self, address: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        registry = CollectorRegistry()
        self.register(registry)
        host, port = m.split_address(address)
        start_http_server(port, addr=host, registry=registry)

    def answered(self, mti: str, rc: str) -> None:
        self.messages[mti, rc] += 1
        if self._prometheus:
            self._prometheus[0].labels(mti, rc).inc()

    def link_closed(self, reason: str) -> None:
        self.closed[reason] += 1
        if self._prometheus:
            self._prometheus[1].labels(reason).inc()

    def set_links(self, n: int) -> None:
        self.links = n
        if self._prometheus:
            self._prometheus[2].set(n)

    def summary(self) -> dict:
        return {"messages": {f"{mti}/{rc}": n for (mti, rc), n in sorted(self.messages.items())},
                "links_closed": dict(self.closed)}


# -- the adapter ----------------------------------------------------------------------------

class Adapter:
    def __init__(self, config: m.IsoConfig):
        self.config = config
        self.spec = config.build_spec()
        self.engine = EngineLink(config)
        self.metrics = IsoMetrics()
        self.links: set[Link] = set()
        self.listener = None

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.sockets[0].getsockname()[:2]

    async def start(self) -> None:
        host, port = m.split_address(self.config.listen)
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(lambda: Link(self), host, port,
                                                 reuse_address=True)
        if self.config.metrics:
            self.metrics.serve(self.config.metrics)
        try:
            await self.engine.get()
        except EngineUnavailable as e:
            log.warning("%s (answering 91 until it is back)", e)
        except RefusedByEngine as e:
            log.error("%s (answering 96: check engine_key_id and engine_secret)", e)
        log.info("iso8583 adapter listening", extra={"fields": {
            "listen": "%s:%d" % self.address, "engine": self.config.engine,
            "framing": self.config.framing, "spec": self.config.spec,
            "merchants": len(self.config.merchants)}})

    async def stop(self) -> None:
        """Stop accepting, let in-flight messages finish (bounded), close."""
        if self.listener is not None:
            self.listener.close()
            await self.listener.wait_closed()
        tasks = [t for link in self.links for t in link.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        for link in list(self.links):
            link.close("adapter stopped")
        self.engine.close()
        log.info("iso8583 adapter stopped", extra={"fields": self.metrics.summary()})

    def admit(self, link: "Link") -> bool:
        if len(self.links) >= self.config.connections_max:
            return False
        self.links.add(link)
        self.metrics.set_links(len(self.links))
        return True

    def forget(self, link: "Link") -> None:
        self.links.discard(link)
        self.metrics.set_links(len(self.links))

    # -- operations ------------------------------------------------------------------

    async def execute(self, request: m.Request, link: "Link") -> dict:
        """The response fields (DE39 and what goes with it) of a financial request."""
        if self.config.require_sign_on and not link.signed_on:
            return {"39": m.RC_ENGINE_UNAVAILABLE}
        if not request.merchant:
            return {"39": m.RC_INVALID_MERCHANT}
        if request.action != m.REVERSE and not m.amount_in_range(request.amount):
            return {"39": m.RC_INVALID_AMOUNT}
        try:
            if request.action in (m.AUTHORIZE, m.PAY):
                return await self.pay(request)
            return await self.lifecycle(request)
        except Declined as e:
            return {"39": e.response_code}
        except EngineUnavailable as e:
            log.warning("engine unavailable for %s: %s", request.mti, e)
            return {"39": m.RC_ENGINE_UNAVAILABLE}
        except RefusedByEngine as e:
            log.error("engine refused %s: %s", request.mti, e)
            return {"39": e.response_code}

    def check_currency(self, request: m.Request) -> None:
        """DE49, when sent, must be the engine's currency (known once connected)."""
        if not self.engine.currency:
            raise Declined(m.RC_SYSTEM_ERROR)       # logged when the engine said its currency
        currency = request.fields.get("49")
        if currency is not None and currency != self.engine.currency:
            raise Declined(m.RC_INVALID_AMOUNT)

    async def pay(self, request: m.Request) -> dict:
        def call(client):
            self.check_currency(request)
            return client.pay_one(id=request.payment, payer=request.code,
                                  merchant=request.merchant, amount=request.amount,
                                  flags=m.pay_flags(request.action))
        result = await self.engine.run(call)
        if not result.ok:
            log.debug("declined", extra={"fields": {
                "mti": request.mti, "status": result.status_name, "stan": request.fields["11"],
                "terminal": request.fields["41"], "code": m.mask_code(request.fields["2"])}})
        return self.outcome(request, result.status, result.cash, result.discount)

    async def lifecycle(self, request: m.Request) -> dict:
        if request.action == m.CAPTURE:
            op, body = "CAPTURE", {"captures": [{"payment": request.payment,
                                                 "amount": request.amount}]}
        else:
            op, body = "REVERSE", {"payments": [request.payment]}
        def call(client):
            if op == "CAPTURE":
                self.check_currency(request)
            return client.call(op, body)
        reply = await self.engine.run(call)
        try:
            result = reply["results"][0]
            return self.outcome(request, int(result["status"]), int(result.get("cash", 0)),
                                int(result.get("discount", 0)))
        except (KeyError, IndexError, TypeError, ValueError):
            raise RefusedByEngine(m.RC_SYSTEM_ERROR, f"unexpected {op} reply") from None

    def outcome(self, request: m.Request, status: int, cash: int, discount: int) -> dict:
        fields = {"39": m.response_code(status)}
        if status == Status.ok:
            fields["38"] = m.approval_code(request.payment)
            currency = request.fields.get("49") or self.engine.currency
            if currency:
                fields["54"] = m.additional_amounts(currency, cash, discount)
        return fields


class Link(asyncio.Protocol):
    """One ISO 8583 connection: frames in, concurrent operations, replies in any order."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.config = adapter.config
        self.transport = None
        self.buffer = bytearray()
        self.tasks: set[asyncio.Task] = set()
        self.outbox: list[bytes] = []        # replies not yet written (flush)
        self.paused = False
        self.write_blocked = False           # the transport's write buffer is full
        self.closed = False
        self.signed_on = False
        self.peer = None
        self.last_active = time.monotonic()
        self.idle_timer = None

    # -- connection --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        host = self.peer[0] if isinstance(self.peer, tuple) else ""
        if not m.peer_allowed(self.config, host):
            log.warning("link refused: peer %s is not in allow_from", host)
            self.adapter.metrics.link_closed("peer not allowed")
            self.closed = True
            transport.abort()
            return
        if not self.adapter.admit(self):
            log.warning("link refused: %d links open (connections_max)", len(self.adapter.links))
            self.adapter.metrics.link_closed("connections_max")
            self.closed = True
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES_MAX)
        self.arm_idle_timer(self.config.idle_timeout_ms / 1000)

    def connection_lost(self, exc) -> None:
        if not self.closed:
            self.adapter.metrics.link_closed("peer closed")
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.adapter.forget(self)

    def close(self, reason: str) -> None:
        """Close the link: what is in flight still completes, its replies are dropped."""
        if self.closed:
            return
        self.flush()                     # replies already made still go out
        self.closed = True
        self.adapter.metrics.link_closed(reason)
        log.info("closing link", extra={"fields": {"peer": str(self.peer), "reason": reason}})
        self.transport.close()

    def arm_idle_timer(self, delay_s: float) -> None:
        self.idle_timer = asyncio.get_running_loop().call_later(delay_s, self.check_idle)

    def check_idle(self) -> None:
        timeout_s = self.config.idle_timeout_ms / 1000
        idle_s = time.monotonic() - self.last_active
        if idle_s >= timeout_s and not self.tasks:
            self.close("idle timeout")
        else:
            self.arm_idle_timer(max(timeout_s - idle_s, 0.05))

    # -- input -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_active = time.monotonic()
        self.buffer += data
        self.drain()

    def drain(self) -> None:
        """Handle whole frames from the buffer while the in-flight limit allows."""
        framing = self.config.framing
        header = header_bytes(framing)
        for _ in range(FRAMES_PER_READ_MAX):
            if self.closed or len(self.buffer) < header:
                return
            if self.write_blocked or len(self.tasks) >= self.config.inflight_max:
                self.pause()
                return
            size = frame_size(framing, bytes(self.buffer[:header]))
            if size is None or size == 0 or size > self.config.frame_bytes_max:
                self.close("frame size unreadable" if size is None else
                           f"frame size {size} outside 1..{self.config.frame_bytes_max}")
                return
            if len(self.buffer) < header + size:
                return
            message = bytes(self.buffer[header:header + size])
            del self.buffer[:header + size]
            try:
                self.handle(message)
            except Exception:   # noqa: BLE001 - a bug costs this link, never the adapter
                log.exception("internal error on a message; closing the link")
                self.close("internal error")
                return
        asyncio.get_running_loop().call_soon(self.drain)    # more than one read's worth

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if (self.paused and not self.closed and not self.write_blocked
                and len(self.tasks) < self.config.inflight_max):
            self.paused = False
            self.transport.resume_reading()
            self.drain()

    # A peer that sends without reading its replies would grow our write
    # buffer without bound: while the transport says it is full, stop reading.
    def pause_writing(self) -> None:
        self.write_blocked = True
        self.pause()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.resume()

    def handle(self, message: bytes) -> None:
        """One message: answered now (format errors, network management) or by a task."""
        try:
            doc = m.decode(message, self.adapter.spec)
        except iso8583.DecodeError as e:
            self.refuse(e.doc_dec, f"{e.msg} (DE{e.field})")
            return
        mti = doc["t"]
        if mti not in m.MTI_ACTIONS:
            self.unsupported(doc)
            return
        try:
            request = m.parse_request(doc, self.config)
        except m.FormatError as e:
            self.refuse(doc, str(e))
            return
        if request.action == m.NETWORK:
            self.reply(doc, self.network(request))
            return
        task = asyncio.get_running_loop().create_task(self.run(request))
        self.tasks.add(task)
        task.add_done_callback(self.finished)

    def refuse(self, doc: dict, reason: str) -> None:
        """A malformed message: DE39 30 if its MTI is readable, else the link closes."""
        mti = doc.get("t", "")
        log.warning("format error", extra={"fields": {"peer": str(self.peer), "mti": mti,
                                                      "reason": reason}})
        if m.response_mti(mti) is None:
            self.adapter.metrics.answered(mti if mti.isdigit() and len(mti) == 4
                                          else MTI_UNREADABLE, "closed")
            self.close("message unreadable")
            return
        valid = {}
        for number, value in doc.items():
            try:
                m.check_fields({number: value})
                valid[number] = value
            except m.FormatError:
                pass
        self.reply(valid, {"39": m.RC_FORMAT_ERROR})

    def unsupported(self, doc: dict) -> None:
        mti = doc["t"]
        if not (len(mti) == 4 and mti.isdigit()):
            self.refuse({}, "the MTI is not 4 digits")
            return
        if m.response_mti(mti) is None:
            log.warning("ignoring a message that is not a request", extra={"fields": {"mti": mti}})
            self.adapter.metrics.answered(mti, "ignored")
            return
        self.reply(doc, {"39": m.RC_FUNCTION_NOT_SUPPORTED})

    def network(self, request: m.Request) -> dict:
        code = request.fields["70"]
        if code == m.NM_SIGN_ON:
            self.signed_on = True
        elif code == m.NM_SIGN_OFF:
            self.signed_on = False
        elif code != m.NM_ECHO:
            return {"39": m.RC_FUNCTION_NOT_SUPPORTED}
        return {"39": m.RC_APPROVED}

    async def run(self, request: m.Request) -> None:
        try:
            fields = await self.adapter.execute(request, self)
        except Exception:   # noqa: BLE001 - a bug must cost one message, never the link
            log.exception("internal error on %s", request.mti)
            fields = {"39": m.RC_SYSTEM_ERROR}
        self.reply(request.fields, fields)

    def finished(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.last_active = time.monotonic()
        if self.paused:
            self.resume()

    # -- output ----------------------------------------------------------------

    def reply(self, request_doc: dict, fields: dict) -> None:
        mti = request_doc["t"]
        response = {"t": m.response_mti(mti),
                    **m.response_fields(request_doc, self.config.echo_fields), **fields}
        self.adapter.metrics.answered(mti, fields["39"])
        if self.closed:
            return      # the link went away: the peer reverses or repeats
        try:
            message = m.encode(response, self.adapter.spec)
        except iso8583.EncodeError as e:
            log.error("cannot encode the %s response (check the field spec): %s",
                      response["t"], e)
            self.close("response not encodable")
            return
        # Replies that complete in one loop pass (one PAY frame's worth, as
        # the client coalesces) leave in one write: a send per reply cost
        # more than the rest of the adapter's work.
        self.outbox.append(frame_prefix(self.config.framing, len(message)))
        self.outbox.append(message)
        if len(self.outbox) == 2:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        outbox, self.outbox = self.outbox, []
        if not self.closed:
            self.transport.write(b"".join(outbox))


async def start_beside(section: dict, server_listen: str, registry=None) -> Adapter:
    """The adapter of a `scanpay serve` config's [iso8583] section, in the
    server's event loop, connected to the server's own TCP listener; its
    counters join the server's Prometheus `registry` (unless the section
    names its own `metrics` endpoint)."""
    host, port = m.split_address(server_listen)
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    engine = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    adapter = Adapter(m.config_from(dict(section), {"engine": engine}))
    if registry is not None and not adapter.config.metrics:
        adapter.metrics.register(registry)
    await adapter.start()
    return adapter


# -- command line ----------------------------------------------------------------------------

def add_parser(sub) -> None:
    """`scanpay iso8583`: registered by engine/cli/__init__.py."""
    p = sub.add_parser("iso8583", help="run an ISO 8583 adapter in front of a Scanpay server")
    p.add_argument("--listen", help="HOST:PORT for ISO 8583 links (default 127.0.0.1:8583)")
    p.add_argument("--engine", help="HOST:PORT of the Scanpay server (default 127.0.0.1:7411)")
    p.add_argument("--config", help="TOML file with an [iso8583] section (docs/iso8583.md)")
    p.add_argument("--metrics", help="HOST:PORT for a Prometheus endpoint")
    p.add_argument("--log-format", dest="log_format", choices=("text", "json"))


def run_command(args) -> int:
    overrides = {k: getattr(args, k) for k in ("listen", "engine", "metrics", "log_format")}
    try:
        config = m.load_config(args.config, overrides)
    except m.IsoConfigError as e:
        print(f"scanpay iso8583: {e}", file=sys.stderr)
        return 2
    import uvloop
    from engine.server.server import setup_logging
    setup_logging(config.log_format)
    try:
        uvloop.run(run_until_signal(Adapter(config)))
    except OSError as e:
        print(f"scanpay iso8583: cannot listen on {config.listen}: {e}", file=sys.stderr)
        return 1
    return 0


async def run_until_signal(adapter: Adapter) -> None:
    import signal
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await adapter.start()
    await stopped.wait()
    await adapter.stop()
