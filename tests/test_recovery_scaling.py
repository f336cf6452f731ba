"""Recovery reads only unfinished work: the query that finds it is served by a partial index."""

from __future__ import annotations

from walstate.storage import Store
from walstate.storage import reads


def test_finding_unfinished_jobs_searches_the_partial_index_instead_of_scanning_the_table(store: Store) -> None:
    plan = store.db.connection().execute("EXPLAIN QUERY PLAN " + reads._UNFINISHED_SQL).fetchall()
    detail = " | ".join(str(row[-1]) for row in plan)
    assert "SEARCH walstate_job USING INDEX job_state_id" in detail, detail
    assert "SCAN walstate_job" not in detail, detail


def test_unfinished_jobs_lists_only_jobs_that_are_not_terminal(store: Store) -> None:
    ids = [store.write.create_job("w", None, "{}", [("s", "p", 0)])[0] for _ in range(4)]
    conn = store.db.connection()
    conn.execute("UPDATE walstate_job SET state='succeeded' WHERE id=?", (ids[0],))
    conn.execute("UPDATE walstate_job SET state='running' WHERE id=?", (ids[1],))
    conn.execute("UPDATE walstate_job SET state='failed' WHERE id=?", (ids[2],))
    assert [j.id for j in store.read.unfinished_jobs()] == [ids[1], ids[3]]


def test_the_dead_owner_scan_reads_only_claimed_unfinished_jobs_through_their_own_index(store: Store) -> None:
    ids = [store.write.create_job("w", None, "{}", [("s", "p", 0)])[0] for _ in range(5)]
    conn = store.db.connection()
    conn.execute("UPDATE walstate_job SET state='running', owner='someone' WHERE id IN (?, ?)", (ids[1], ids[3]))
    conn.execute("UPDATE walstate_job SET state='succeeded', owner='someone' WHERE id=?", (ids[4],))
    assert [row[0] for row in store.read.owned_unfinished()] == [ids[1], ids[3]]
    sql = ("EXPLAIN QUERY PLAN SELECT id FROM walstate_job INDEXED BY job_owned_unfinished "
           "WHERE state IN ('pending', 'running') AND owner IS NOT NULL")
    detail = " | ".join(str(row[-1]) for row in conn.execute(sql).fetchall())
    assert "USING INDEX job_owned_unfinished" in detail and "SCAN walstate_job" not in detail, detail


def test_the_next_wake_up_is_read_from_the_parked_jobs_index_in_wake_up_order(store: Store) -> None:
    ids = [store.write.create_job(wf, None, "{}", [("s", "p", 0)])[0] for wf in ("w", "w", "other", "w")]
    conn = store.db.connection()
    for job_id, wake in zip(ids, (50.0, 30.0, 10.0, None)):
        conn.execute("UPDATE walstate_job SET state='running', wake_at=? WHERE id=?", (wake, job_id))
    assert store.read.next_wake(["w"]) == 30.0  # the other workflow's earlier job is not ours
    assert store.read.next_wake(["nothing"]) is None
    sql = ("EXPLAIN QUERY PLAN SELECT wake_at FROM walstate_job INDEXED BY job_parked_wake_at "
           "WHERE state IN ('pending', 'running') AND owner IS NULL AND wake_at IS NOT NULL ORDER BY wake_at LIMIT 1")
    detail = " | ".join(str(row[-1]) for row in conn.execute(sql).fetchall())
    assert "job_parked_wake_at" in detail and "TEMP B-TREE" not in detail, detail
