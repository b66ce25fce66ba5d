"""Targeted campaigns (docs/reference/rules.md, "Precision marketing"): the
frozen treated and holdout groups each campaign keeps, and how they go
into snapshots and the canonical tables.

A campaign's groups are fixed when it is applied: the segment's users at
that engine time, ascending, each with whether it is held out and what
issuing its coupon gave (the ISSUE status and duplicate flag; nothing for
the holdout). They are numpy arrays, not a Python object per user.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core import canonical as cn
from engine.protocol.status import Status

MEMBER = np.dtype([("user", "<u8"), ("holdout", "u1"), ("status", "u1"), ("duplicate", "u1")])
# Every campaign's members in one snapshot array, campaign by campaign (by id).
SNAPSHOT_MEMBER = np.dtype([("campaign", "<u8")] + [(n, MEMBER[n]) for n in MEMBER.names])
# What a CAMPAIGNS item says, defaults filled in: a retry compares these.
REQUEST_KEYS = ("name", "segment", "stock", "holdout_bps", "coupon_base")
NOT_ISSUED_DUPLICATE = "duplicate"      # the user already held that coupon id of that stock


@dataclass
class Campaign:
    request: dict               # REQUEST_KEYS -> value
    at: int                     # the engine time it was applied
    merchants: list             # the segment's scope then: where conversions count
    tags: list
    members: np.ndarray         # MEMBER rows, by user id ascending

    @property
    def treated(self) -> np.ndarray:
        return self.members[self.members["holdout"] == 0]

    def coupon_ids(self) -> np.ndarray:
        """Each member's coupon id: coupon_base + its rank in the segment."""
        base = np.uint64(self.request["coupon_base"])
        return base + np.arange(len(self.members), dtype=np.uint64)

    def issued_mask(self) -> np.ndarray:
        """The members this campaign issued a new coupon to."""
        m = self.members
        return (m["holdout"] == 0) & (m["status"] == Status.ok) & (m["duplicate"] == 0)

    def summary(self) -> dict:
        """The figures of CAMPAIGNS' result (and LIFT's)."""
        treated = self.treated
        failed = treated["status"][treated["status"] != Status.ok]
        counts = np.bincount(failed, minlength=1) if len(failed) else np.zeros(1, np.int64)
        not_issued = {Status(code).name: int(n) for code, n in enumerate(counts) if n}
        duplicates = int(((treated["status"] == Status.ok) & (treated["duplicate"] != 0)).sum())
        if duplicates:
            not_issued[NOT_ISSUED_DUPLICATE] = duplicates
        return {"size": len(self.members), "treated": len(treated),
                "holdout": len(self.members) - len(treated),
                "issued": int(self.issued_mask().sum()), "not_issued": not_issued,
                "at": self.at}

    def to_meta(self) -> dict:
        return {"request": self.request, "at": self.at, "merchants": self.merchants,
                "tags": self.tags, "members": len(self.members)}


def to_snapshot(campaigns: dict) -> tuple[np.ndarray, dict]:
    """(members array, meta) of every campaign, by campaign id."""
    ids = sorted(campaigns)
    rows = np.zeros(sum(len(campaigns[c].members) for c in ids), SNAPSHOT_MEMBER)
    at = 0
    for campaign_id in ids:                 # (bounded: at most CAMPAIGNS_MAX campaigns)
        members = campaigns[campaign_id].members
        part = rows[at:at + len(members)]
        part["campaign"] = campaign_id
        for name in MEMBER.names:
            part[name] = members[name]
        at += len(members)
    return rows, {str(c): campaigns[c].to_meta() for c in ids}


def from_snapshot(rows: np.ndarray | None, meta: dict) -> dict:
    """The campaigns of a snapshot (none in one written before campaigns)."""
    out = {}
    at = 0
    rows = np.zeros(0, SNAPSHOT_MEMBER) if rows is None else rows
    for key in sorted(meta, key=int):
        m = meta[key]
        part = rows[at:at + m["members"]]
        assert len(part) == m["members"] and (part["campaign"] == int(key)).all(), \
            f"campaign {key}: its members are not where the snapshot says"
        members = np.zeros(len(part), MEMBER)
        for name in MEMBER.names:
            members[name] = part[name]
        out[int(key)] = Campaign(m["request"], m["at"], m["merchants"], m["tags"], members)
        at += len(part)
    assert at == len(rows), "campaign members without a campaign in the snapshot"
    return out


def bound(value) -> int:
    """A definition's optional bound in the canonical tables (-1: none)."""
    return -1 if value is None else value


def canonical_tables(state) -> dict:
    """Stock names, segments and campaigns as the canonical tables of
    engine/core/canonical.py (unsorted: normalize sorts them)."""
    segments, campaigns = state.segments, state.campaigns
    seg_rows = [(i, d["name"].encode(), d["from"], bound(d["until"]), bound(d["days"]),
                 d["payments_min"], bound(d["payments_max"]), d["gmv_min"], bound(d["gmv_max"]),
                 bound(d["recency_days_min"]), bound(d["recency_days_max"]), d["never_paid"],
                 d["program"] or 0, bound(d["points_min"])) for i, d in segments.items()]
    camp_rows = [(i, c.request["name"].encode(), c.request["segment"], c.request["stock"],
                  c.request["holdout_bps"], c.request["coupon_base"], c.at)
                 for i, c in campaigns.items()]
    members = to_snapshot(campaigns)[0]
    return {
        "stock_names": rows(cn.STOCK_NAMES, [(i, n.encode()) for i, n in state.stock_names.items()]),
        "segments": rows(cn.SEGMENTS, seg_rows),
        "segment_lists": rows(cn.SEGMENT_LISTS, scope_rows(segments, lambda d: d)),
        "campaigns": rows(cn.CAMPAIGNS, camp_rows),
        "campaign_lists": rows(cn.CAMPAIGN_LISTS, scope_rows(
            campaigns, lambda c: {"merchants": c.merchants, "tags": c.tags})),
        "campaign_members": members.astype(cn.CAMPAIGN_MEMBERS),
    }


def scope_rows(items: dict, scope_of) -> list:
    """(owner, list, value) rows: list 0 the merchants, 1 the tags."""
    return [(i, which, v) for i, item in items.items()
            for which, key in ((0, "merchants"), (1, "tags")) for v in scope_of(item)[key]]


def rows(dtype: np.dtype, values: list) -> np.ndarray:
    return np.array(values, dtype) if values else np.zeros(0, dtype)
