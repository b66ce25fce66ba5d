"""Field checks for map requests: each failure is `invalid_argument` with a
message naming the field (docs/reference/protocol.md, "General")."""
from engine.protocol.limits import NAME_BYTES_MAX
from engine.protocol.status import STATUS_OK, Status

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
I63_MAX = 2**63 - 1
COUNT_MAX = 2**62


class Invalid(Exception):
    """A malformed field. Carries the item status and a message."""

    def __init__(self, message: str, status: Status = Status.invalid_argument):
        super().__init__(message)
        self.status = status


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(item: dict, key: str, lo: int, hi: int, default=None,
            status: Status = Status.invalid_argument) -> int:
    """item[key] as an int in lo..hi; `default` when absent (None = required)."""
    if key not in item:
        if default is None:
            raise Invalid(f"`{key}` is required")
        return default
    value = item[key]
    if not is_int(value):
        raise Invalid(f"`{key}` must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise Invalid(f"`{key}` must be in {lo}..{hi}, got {value}", status)
    return value


def u64(item: dict, key: str, default=None) -> int:
    return integer(item, key, 0, U64_MAX, default)


def u64_list(item: dict, key: str, length_max: int, value_max: int = U64_MAX,
             nonzero: bool = False) -> list[int]:
    """item[key] as a list of ints in 0..value_max (absent = empty)."""
    values = item.get(key, [])
    if not isinstance(values, (list, tuple)):
        raise Invalid(f"`{key}` must be a list")
    if len(values) > length_max:
        raise Invalid(f"`{key}` holds at most {length_max} values, got {len(values)}")
    lo = 1 if nonzero else 0
    for value in values:
        if not is_int(value) or not lo <= value <= value_max:
            raise Invalid(f"`{key}` must hold integers in {lo}..{value_max}, got {value!r}")
    return list(values)


def choice(item: dict, key: str, names: tuple[str, ...]) -> int:
    """item[key] as the index of one of `names` (required)."""
    if key not in item:
        raise Invalid(f"`{key}` is required")
    value = item[key]
    if value not in names:
        raise Invalid(f"`{key}` must be one of {', '.join(names)}, got {value!r}")
    return names.index(value)


def only_keys(item: dict, allowed: frozenset) -> None:
    unknown = [k for k in item if k not in allowed]
    if unknown:
        raise Invalid(f"unknown key `{unknown[0]}` (allowed: {', '.join(sorted(allowed))})")


def item_id(item, allowed: frozenset, key: str = "id") -> int:
    """The item's own id: a map with a nonzero u64 `key` and known keys only."""
    if not isinstance(item, dict):
        raise Invalid(f"an item must be a map, got {type(item).__name__}")
    ident = u64(item, key)
    if ident == 0:
        raise Invalid(f"`{key}` must be nonzero", Status.invalid_id)
    only_keys(item, allowed)
    return ident


def failure(status: Status, message: str | None = None) -> dict:
    """A failed item's result map."""
    out = {"status": int(status), "error": status.name}
    if status == Status.invalid_argument and message:
        out["message"] = message
    return out


def result(status: Status = Status.ok, duplicate: bool = False) -> dict:
    """An item's result map."""
    if status != Status.ok:
        return failure(status)
    return {"status": STATUS_OK, "duplicate": True} if duplicate else {"status": STATUS_OK}


def display_name(item: dict, key: str = "name") -> str:
    """An optional display name: a string of at most NAME_BYTES_MAX UTF-8
    bytes with no control character ("" when absent)."""
    value = item.get(key, "")
    if not isinstance(value, str):
        raise Invalid(f"`{key}` must be a string")
    if len(value.encode("utf-8", "surrogatepass")) > NAME_BYTES_MAX:
        raise Invalid(f"`{key}` holds at most {NAME_BYTES_MAX} UTF-8 bytes")
    if any(ord(ch) < 0x20 or 0xD800 <= ord(ch) < 0xE000 for ch in value):
        raise Invalid(f"`{key}` must be printable text")
    return value
