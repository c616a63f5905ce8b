"""`device-sim bench`: every load scenario against hub processes and a local InfluxDB.

`harness` starts the hubs, `loadgen` runs simulated devices in worker processes (the hub
keeps a core to itself), `drive` runs and samples a load, `procstat` reads CPU and memory
from /proc, `scenarios` measures one hub (1-7), `workers` `hub serve --workers N` (8),
`multihub` several hubs on one PostgreSQL behind HAProxy (9-11), and `report` prints the
table and writes the JSON and chart.
"""
