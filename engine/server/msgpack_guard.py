"""The one gate in front of msgspec for MessagePack request bodies.

msgspec decodes recursively (a body nested about 1,000 deep raised
RecursionError out of the connection's handler) and, for a map with a
repeated key, keeps the last value: TOPUP `{amount: 5, amount: 10**9}`
credited 10**9 while a reader of the first key saw 5. So every request map a
client sends is first walked here, iteratively (an explicit stack, never the
Python stack), and refused when it nests deeper than `DEPTH_MAX` or when a map
repeats a key (compared as decoded: `"a"` as fixstr and as str8 are the same
key). Map keys must be strings or integers: no request has any other kind,
and keys such as `true` and `1` would collide in a Python dict.

Only then does msgspec decode it. The journal's own bodies passed this gate
before they were written, so replay decodes them with msgspec directly (and
still decodes journals written before the gate existed).
"""
import msgspec

from engine._framing import check_map_body

DEPTH_MAX = 32                  # containers inside containers; requests use at most 4
_decoder = msgspec.msgpack.Decoder()


class BodyRefused(ValueError):
    """The body is not an acceptable MessagePack map (`bad_body`)."""


def decode_map(body) -> dict:
    """The request map of `body` (empty body: the empty map), or BodyRefused."""
    if not body:
        return {}
    check(body)
    try:
        value = _decoder.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError) as e:
        raise BodyRefused(f"not MessagePack: {e}") from None
    if not isinstance(value, dict):
        raise BodyRefused(f"the body is a {type(value).__name__}, not a map")
    return value


def check(body, depth_max: int = DEPTH_MAX) -> None:
    """Raise BodyRefused if `body` nests deeper than `depth_max` or repeats a
    key in a map (ext/framing.pyx check_map_body: a walk in C, about 100 times
    faster than the same in Python, which took 0.4 us an item: 400 ms for a
    1 MiB HELLO before authentication). Malformed or truncated MessagePack is
    left for msgspec to refuse, except where the walk cannot go on past it."""
    try:
        check_map_body(body, depth_max)
    except ValueError as e:
        raise BodyRefused(str(e)) from None
