"""The raw-driver arm's SQLite statement: one row per `executemany` parameter set.

The destination itself inserts a chunk of rows with one statement (`_INSERT_ROWS` in
nexus_gevent/destinations/sqlite.py); the raw arms measure what sqlite3 does with the
plain form a driver's user writes, the destination's row-at-a-time INSERT until the
fourth round: the same table, the same conflict rule, `seq` assigned in the statement.
"""

INSERT = """
    INSERT INTO nexus_entries (
        seq, payload_id, source, destination, subject, idempotency_key,
        received_at, payload, delivered_at
    ) VALUES (
        (SELECT COALESCE(MAX(seq), 0) + 1 FROM nexus_entries), ?, ?, ?, ?, ?, ?, ?, ?
    )
    ON CONFLICT (payload_id) DO NOTHING
"""
