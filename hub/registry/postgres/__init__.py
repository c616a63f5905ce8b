"""The registry on PostgreSQL, for hubs that share one fleet (issue 12).

`migrations` creates and upgrades the schema from the numbered SQL files in `migrations/`;
`queries` (what hubs read and record) and `operator_queries` (what operators change) hold
each operation as one named, documented statement; `backend` runs them behind the hub's
ports (with `doorbell` and `lease`), `operator` behind the commands' port, both on
connections from `connect`.
"""
