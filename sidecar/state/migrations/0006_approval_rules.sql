-- The approval rules of the tier when a request was made (Policy.approval_rules: approvers,
-- the groups that grant their roles, counts, approver condition). A request whose rules the
-- policy no longer has is stale: it can neither be judged nor used. Requests made before this
-- column existed have '' and are stale too: their calls ask for approval again.
ALTER TABLE approvals ADD COLUMN rules TEXT NOT NULL DEFAULT '';
