-- The outbox publishes the rows of one (topic, key) in the order they were written (worker/sql/queries.sql
-- outbox_claim): a row is claimed only when no earlier row of its key is still in the table.
--
-- Why: outbox_claim ordered by (attempts, id) so that a row that failed to publish went last. For an alert that
-- meant a resolved message written after its triggered one could reach the topic first, while the triggered one
-- waited out its failure (and a second replica could take the resolved row while the first held the triggered
-- one): receivers saw the alert resolved, then opened for good (tests/test_outbox.py).
--
-- Two indexes keep the claim cheap on a backlog (the broker down for a while): the claim walks (attempts, id) and
-- probes (topic, key, id) for an earlier row of the same key, so it stops after the round's rows instead of
-- sorting and anti-joining the whole table. Measured on 200,000 waiting rows (100,000 alerts of 3,000 budgets,
-- 100,000 dead letters): 4 ms per round of 500 with both indexes; without them the same claim took 600-1,250 ms
-- (and the previous claim 58 ms). The outbox is drained continuously and holds few rows, so the plain
-- CREATE INDEX locks it for milliseconds.

CREATE INDEX IF NOT EXISTS outbox_key_order ON outbox (topic, key, id);
CREATE INDEX IF NOT EXISTS outbox_claim_order ON outbox (attempts, id);
