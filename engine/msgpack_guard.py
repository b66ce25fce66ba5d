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

DEPTH_MAX = 32                  # containers inside containers; requests use at most 4
_decoder = msgspec.msgpack.Decoder()

# Bytes after the type byte for fixed-size scalars.
_FIXED = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8,
          0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8, 0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17}
# Length-prefixed: (bytes of the length, extra bytes before the data (ext type)).
_SIZED = {0xc4: (1, 0), 0xc5: (2, 0), 0xc6: (4, 0), 0xc7: (1, 1), 0xc8: (2, 1), 0xc9: (4, 1),
          0xd9: (1, 0), 0xda: (2, 0), 0xdb: (4, 0)}
_STR_TYPES = frozenset({0xd9, 0xda, 0xdb})
_INT_BYTES = {0xcc: (1, False), 0xcd: (2, False), 0xce: (4, False), 0xcf: (8, False),
              0xd0: (1, True), 0xd1: (2, True), 0xd2: (4, True), 0xd3: (8, True)}


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
    key in a map. Malformed or truncated MessagePack is left for msgspec to
    refuse, except where this walk cannot go on past it."""
    data = bytes(body)
    end = len(data)
    # Open containers: [items left, keys seen (a set for a map, else None)];
    # in a map, items alternate key, value (so a key is read when items is even).
    stack = []
    at = 0
    for _ in range(2 * end + 2):            # a step takes a byte or closes a container
        if stack:
            top = stack[-1]
            if top[0] == 0:
                stack.pop()
                continue
            top[0] -= 1
            keys = top[1]
            if keys is not None and top[0] % 2:     # odd items left: this one is a key
                key, at = read_key(data, at, end)
                if key in keys:
                    raise BodyRefused(f"a map repeats the key {key!r}")
                keys.add(key)
                continue
        elif at:                            # the top-level item is done
            return
        if at >= end:
            raise BodyRefused("the body ends inside an item")
        at, container = skip_item(data, at, end)
        if container is not None:
            if len(stack) >= depth_max:
                raise BodyRefused(f"the body nests deeper than {depth_max} levels")
            stack.append(container)
    raise AssertionError("the walk takes one byte or more per step")


def skip_item(data: bytes, at: int, end: int):
    """(where the next item starts, [items, keys] if this one is a container
    whose items follow, else None) for the item at `at`."""
    b = data[at]
    if b <= 0x7f or b >= 0xe0:
        return at + 1, None
    if b <= 0x8f:
        return at + 1, container(b & 0x0f, True, at + 1, end)
    if b <= 0x9f:
        return at + 1, container(b & 0x0f, False, at + 1, end)
    if b <= 0xbf:
        return at + 1 + (b & 0x1f), None
    if b in _FIXED:
        return at + 1 + _FIXED[b], None
    if b in _SIZED:
        width, extra = _SIZED[b]
        return at + 1 + width + extra + unsigned(data, at + 1, width, end), None
    if b in (0xdc, 0xdd, 0xde, 0xdf):
        width = 2 if b in (0xdc, 0xde) else 4
        count = unsigned(data, at + 1, width, end)
        return at + 1 + width, container(count, b >= 0xde, at + 1 + width, end)
    raise BodyRefused(f"byte 0x{b:02x} at {at} is not MessagePack")


def container(count: int, is_map: bool, at: int, end: int) -> list:
    items = count * 2 if is_map else count
    if items > end - at:                    # each item takes at least one byte
        raise BodyRefused(f"a container of {count} items does not fit in the body")
    return [items, set() if is_map else None]


def unsigned(data: bytes, at: int, width: int, end: int) -> int:
    if at + width > end:
        raise BodyRefused("the body ends inside an item")
    return int.from_bytes(data[at:at + width], "big")


def read_key(data: bytes, at: int, end: int):
    """(the decoded key, where its value starts): a string or an integer."""
    if at >= end:
        raise BodyRefused("the body ends inside a map")
    b = data[at]
    if b <= 0x7f:
        return b, at + 1
    if b >= 0xe0:
        return b - 0x100, at + 1
    if 0xa0 <= b <= 0xbf or b in _STR_TYPES:
        start, nxt = (at + 1, at + 1 + (b & 0x1f)) if b <= 0xbf else string_span(data, at, end)
        if nxt > end:
            raise BodyRefused("the body ends inside a map key")
        try:
            return data[start:nxt].decode(), nxt
        except UnicodeDecodeError:
            raise BodyRefused("a map key is not UTF-8") from None
    if b in _INT_BYTES:
        width, signed = _INT_BYTES[b]
        if at + 1 + width > end:
            raise BodyRefused("the body ends inside a map key")
        return int.from_bytes(data[at + 1:at + 1 + width], "big", signed=signed), at + 1 + width
    raise BodyRefused(f"map keys must be strings or integers (byte 0x{b:02x} at {at})")


def string_span(data: bytes, at: int, end: int):
    width = _SIZED[data[at]][0]
    start = at + 1 + width
    return start, start + unsigned(data, at + 1, width, end)
