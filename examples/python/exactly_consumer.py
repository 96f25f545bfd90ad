#!/usr/bin/env python3
"""An exactly-once consumer in Python: confluent-kafka reads, PostgreSQL applies.

Each message is applied in one database transaction together with `exactly_claim`, which
records its idempotency key (the `exactly-key` header) and answers true the first time, false
on a repeat. The offset is committed only after the database commit, so a crash between the
two redelivers the message and the claim turns the repeat into a no-op.

Install the functions once with `exactly migrate --database postgres://...`.

    python3 exactly_consumer.py --brokers 127.0.0.1:9092 --topic orders --group billing \
        --database postgres://postgres@127.0.0.1/shop

The handler here records each event in `py_applied`; replace `apply()` with your own writes.
A key the claim refuses (too old for the horizon, a source that went backwards, not an
exactly key: SQLSTATE EXK01, EXK02, EXK03) is parked in `py_parked` with the reason, and the
partition moves on.
"""

import argparse
import json
import os
import signal
import sys
import time

import psycopg
from confluent_kafka import Consumer, KafkaError

SCHEMA = """
CREATE TABLE IF NOT EXISTS py_applied (
    seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL, payload JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS py_repeats (key TEXT NOT NULL, seen_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS py_parked (
    topic TEXT NOT NULL, partition INT NOT NULL, "offset" BIGINT NOT NULL, reason TEXT NOT NULL);
"""

REFUSALS = {"EXK01", "EXK02", "EXK03"}


def header(message, name):
    for key, value in message.headers() or []:
        if key == name:
            return value.decode("utf-8") if value is not None else None
    return None


def apply(cur, message):
    """The business effect: runs inside the claim's transaction."""
    cur.execute(
        "INSERT INTO py_applied (event_id, event_type, aggregate_id, payload) VALUES (%s, %s, %s, %s)",
        (
            header(message, "exactly-event-id"),
            header(message, "exactly-event-type"),
            header(message, "exactly-aggregate-id"),
            message.value().decode("utf-8"),
        ),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--exit-when-idle", type=float, default=0,
                        help="exit once every assigned partition is read to its end and this many seconds "
                             "passed without a message (0: run until stopped)")
    parser.add_argument("--session-timeout-ms", type=int, default=45000,
                        help="how soon the group notices a member that died (and gives its partitions to others)")
    parser.add_argument("--kill-after", type=int, default=0,
                        help="test fault: SIGKILL this process after the N-th database commit, before its offset commit")
    args = parser.parse_args()

    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "session.timeout.ms": args.session_timeout_ms,
    })
    assigned, at_end = set(), set()

    def on_assign(_consumer, partitions):
        assigned.update((p.topic, p.partition) for p in partitions)

    def on_revoke(_consumer, partitions):
        for p in partitions:
            assigned.discard((p.topic, p.partition))
            at_end.discard((p.topic, p.partition))

    consumer.subscribe([args.topic], on_assign=on_assign, on_revoke=on_revoke)
    stats = {"applied": 0, "repeats": 0, "parked": 0}
    with psycopg.connect(args.database) as db:
        db.execute(SCHEMA)
        db.commit()
        last_message = time.monotonic()
        commits = 0
        while True:
            message = consumer.poll(0.5)
            if message is None or message.error():
                if message is not None and message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add((message.topic(), message.partition()))
                elif message is not None:
                    print(f"consumer error: {message.error()}", file=sys.stderr)
                idle = time.monotonic() - last_message
                if args.exit_when_idle and assigned and assigned <= at_end and idle > args.exit_when_idle:
                    break
                continue
            last_message = time.monotonic()
            at_end.discard((message.topic(), message.partition()))
            key = header(message, "exactly-key")
            try:
                with db.transaction():
                    with db.cursor() as cur:
                        cur.execute(
                            "SELECT exactly_claim(%s, %s, %s, %s, %s)",
                            (args.group, key, message.topic(), message.partition(), message.offset()),
                        )
                        if cur.fetchone()[0]:
                            apply(cur, message)
                            stats["applied"] += 1
                        else:
                            cur.execute("INSERT INTO py_repeats (key) VALUES (%s)", (key,))
                            stats["repeats"] += 1
            except psycopg.Error as error:
                if getattr(error, "sqlstate", None) not in REFUSALS:
                    raise
                with db.transaction():
                    db.execute(
                        'INSERT INTO py_parked (topic, partition, "offset", reason) VALUES (%s, %s, %s, %s)',
                        (message.topic(), message.partition(), message.offset(), str(error)),
                    )
                stats["parked"] += 1
            commits += 1
            if args.kill_after and commits == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            consumer.commit(message=message, asynchronous=False)
    consumer.close()
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
