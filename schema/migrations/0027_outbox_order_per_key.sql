-- The outbox publishes the rows of one (topic, key) in the order they were written (worker/sql/queries.sql
-- outbox_claim): a row is claimed only when no earlier row of its key is still in the table.
--
-- Why: outbox_claim ordered by (attempts, id) so that a row that failed to publish went last. For an alert that
-- meant a resolved message written after its triggered one could reach the topic first, while the triggered one
-- waited out its failure (and a second replica could take the resolved row while the first held the triggered
-- one): receivers saw the alert resolved, then opened for good (tests/test_outbox.py). This index lets the claim
-- find an earlier row of the same key with one probe. The outbox is drained continuously and holds few rows, so
-- the plain CREATE INDEX locks it for milliseconds.

CREATE INDEX IF NOT EXISTS outbox_key_order ON outbox (topic, key, id);
