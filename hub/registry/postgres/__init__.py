"""The registry's PostgreSQL schema and statements, for hubs that share one fleet (issue 12).

`migrations` creates and upgrades the schema from the numbered SQL files in `migrations/`;
`queries` holds each registry operation as one named, documented statement. The backend that
runs them behind the registry's ports comes with the registry redesign.
"""
