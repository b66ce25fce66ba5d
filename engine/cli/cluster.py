"""`scanpay cluster up|status|down`: a local replicated cluster in one
command (engine/replication/cluster.py, docs/replication.md "A local cluster").

    scanpay cluster up [--nodes 3] [--dir D] [--base-port 7411] [--lease-ms MS]
    scanpay cluster status [--dir D] [--json]     exit 0 healthy, 1 not, 2 no cluster
    scanpay cluster down [--dir D]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
DIGEST_SHOWN_CHARS = 16


def default_dir() -> str:
    """One cluster per user by default, so that status and down find it."""
    return os.path.join(tempfile.gettempdir(), f"scanpay-cluster-{os.getuid()}")


def add_parsers(sub) -> None:
    from engine.replication.cluster import BASE_PORT_DEFAULT, NODES_MAX, Settings
    p = sub.add_parser("cluster", help="a local replicated cluster: NATS servers and scanpay "
                                       "nodes on loopback (up, status, down)")
    actions = p.add_subparsers(dest="cluster_action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="start N NATS servers and N scanpay nodes (one leads)")
    up.add_argument("--nodes", type=int, default=3,
                    help=f"NATS servers and scanpay nodes, 1..{NODES_MAX} (default 3)")
    up.add_argument("--base-port", dest="base_port", type=int, default=BASE_PORT_DEFAULT,
                    help="scanpay nodes on P, P+1, ..; NATS clients on P+10..; routes on "
                         "P+20..; 0: free ports (default %(default)s)")
    up.add_argument("--lease-ms", dest="lease_ms", type=int, default=Settings.lease_ms,
                    help="the leader's lease (default %(default)s): failover takes about this")
    up.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                    default=Settings.checkpoint_every_entries, metavar="COMMANDS",
                    help="state digests compared every this many commands (default %(default)s)")
    up.add_argument("--test-clock", dest="test_clock", action="store_true",
                    help="nodes accept CLOCK (tests and the demo only)")
    status = actions.add_parser("status", help="roles, the lease, each node's stream seq and "
                                               "lag, the last checkpoint's digests")
    status.add_argument("--json", action="store_true", help="the same as JSON")
    down = actions.add_parser("down", help="stop every process of the cluster, by pid "
                                           "(the data stays)")
    for q in (up, status, down):
        q.add_argument("--dir", default=None, help=f"the cluster's directory (default "
                                                   f"{default_dir()})")


def run(args, stdout=None, stderr=None) -> int:
    from engine.replication.cluster import ClusterError
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    directory = os.path.abspath(args.dir or default_dir())
    try:
        if args.cluster_action == "up":
            return run_up(args, directory, stdout)
        if args.cluster_action == "status":
            return run_status(args, directory, stdout)
        return run_down(directory, stdout)
    except ClusterError as error:
        print(f"scanpay cluster {args.cluster_action}: {error}", file=stderr)
        return EXIT_USAGE
    except OSError as error:            # the directory cannot be made or written
        print(f"scanpay cluster {args.cluster_action}: {error.strerror or error} "
              f"({error.filename or directory}): give a --dir this user may write", file=stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        done = "what it had started is stopped" if args.cluster_action == "up" else "stopped"
        print(f"scanpay cluster {args.cluster_action}: interrupted; {done}", file=stderr)
        return 130


def dir_flag(directory: str) -> str:
    """`--dir D ` when D is not the default (the hints then work as printed)."""
    return "" if directory == os.path.abspath(default_dir()) else f" --dir {directory}"


def run_up(args, directory: str, out) -> int:
    from engine.replication.cluster import LocalCluster, Settings
    settings = Settings(lease_ms=args.lease_ms, checkpoint_every_entries=args.checkpoint_every,
                        test_clock=args.test_clock)
    cluster = LocalCluster.prepare(directory, args.nodes, args.base_port, settings)
    print(f"starting {len(cluster.nats)} NATS servers and {len(cluster.nodes)} scanpay nodes "
          f"in {directory} ...", file=out, flush=True)
    cluster.up()
    print_members(cluster, out)
    d = dir_flag(directory)
    connect = ",".join(cluster.addresses)
    print(f"\nclients:  --connect {connect}\n"
          f"try:      scanpay demo --cluster --connect {connect} --payments 100000\n"
          f"status:   scanpay cluster status{d}\n"
          f"stop:     scanpay cluster down{d}\n"
          f"logs:     {directory}/s1.log .. , {directory}/nats/n1/nats.log ..", file=out)
    return EXIT_OK


def print_members(cluster, out) -> None:
    from engine.replication.cluster import hello_of
    for member in cluster.nodes:
        role = (hello_of(member) or {}).get("role", "no answer")
        print(f"  scanpay {member.name}  {member.address:<21} {role:<9} pid {member.pid}",
              file=out)
    for member in cluster.nats:
        print(f"  NATS    {member.name}  nats://{member.address:<14} {'':<9} pid {member.pid}",
              file=out)


def run_down(directory: str, out) -> int:
    from engine.replication.cluster import LocalCluster
    cluster = LocalCluster.load(directory)
    for name, what in cluster.down():
        print(f"  {name}: {what}", file=out)
    print(f"the cluster in {directory} is down; its data stays there (`scanpay cluster up"
          f"{dir_flag(directory)}` starts it again, `rm -r {directory}` discards it)", file=out)
    return EXIT_OK


def run_status(args, directory: str, out) -> int:
    from engine.replication import cluster as cluster_module
    view = cluster_module.status(cluster_module.LocalCluster.load(directory))
    if args.json:
        json.dump(view, out, indent=1)
        out.write("\n")
    else:
        print_status(view, out)
    return EXIT_OK if view["healthy"] else EXIT_UNHEALTHY


def print_status(view: dict, out) -> None:
    health = "healthy" if view["healthy"] else "NOT HEALTHY: " + "; ".join(view["problems"])
    print(f"cluster in {view['directory']}: {health}", file=out)
    if view["nats_error"]:
        print(f"stream and lease: unknown ({view['nats_error']})", file=out)
    else:
        print(stream_line(view["stream"]), file=out)
        print(lease_line(view["lease"]), file=out)
    print(f"\n{'node':<5} {'address':<21} {'pid':>8}  {'role':<10} {'stream seq':>10} "
          f"{'lag':>6}  checkpoint", file=out)
    for n in view["nodes"]:
        point = n["checkpoint"]
        shown = f"{point['seq']} {point['digest'][:DIGEST_SHOWN_CHARS]}" if point else "-"
        print(f"{n['name']:<5} {n['address']:<21} {dash(n['pid']):>8}  "
              f"{n['role'] or 'down':<10} {dash(n['stream_seq']):>10} {dash(n['lag']):>6}  "
              f"{shown}", file=out)
    print(f"\n{'NATS':<5} {'url':<28} {'pid':>8}  stream", file=out)
    for s in view["nats"]:
        role = "leader" if s["stream_leader"] else ("replica" if s["running"] else "down")
        print(f"{s['name']:<5} {s['url']:<28} {dash(s['pid']):>8}  {role}", file=out)
    print("\n" + checkpoint_line(view["checkpoint"]), file=out)


def dash(value) -> str:
    return "-" if value is None else str(value)


def stream_line(stream: dict | None) -> str:
    if stream is None:
        return "stream: none yet (no node has started)"
    if stream.get("error"):
        return f"stream {stream['name']}: {stream['error']}"
    return (f"stream {stream['name']}: messages {stream['first_seq']}..{stream['last_seq']} "
            f"({stream['messages']:,}, {stream['bytes'] / 2**20:,.1f} MiB), "
            f"{stream['replicas']} replicas, led by NATS {stream['leader']}")


def lease_line(lease: dict | None) -> str:
    if lease is None:
        return "lease: never taken"
    if lease.get("error"):
        return f"lease: {lease['error']}"
    holder = lease["holder"]
    age = f"{lease['age_ms'] / 1000:.1f} s ago" if lease["age_ms"] is not None else "?"
    if holder is None:
        return f"lease: free (released or expired; last written {age})"
    return (f"lease: held by {holder.get('address')} (pid {holder.get('pid')}), revision "
            f"{lease['revision']}, renewed {age}, TTL {lease['ttl_ms'] / 1000:.1f} s")


def checkpoint_line(checkpoint: dict | None) -> str:
    if checkpoint is None:
        return "checkpoint: none yet"
    names = ", ".join(sorted(checkpoint["digests"]))
    if checkpoint["agree"]:
        line = (f"checkpoint at command {checkpoint['seq']}: digests agree ({names}): "
                f"{next(iter(checkpoint['digests'].values()))}")
    else:
        line = f"checkpoint at command {checkpoint['seq']}: DIGESTS DIFFER: " + ", ".join(
            f"{name} {digest}" for name, digest in sorted(checkpoint["digests"].items()))
    if checkpoint["behind"]:
        line += f"; not there yet: {', '.join(checkpoint['behind'])}"
    return line

