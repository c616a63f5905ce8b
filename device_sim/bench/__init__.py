"""`device-sim bench`: every load scenario against a hub process and a local InfluxDB.

`harness` starts the servers and provisions devices, `loadgen` runs simulated devices in
worker processes (the hub keeps a core to itself), `procstat` reads CPU and memory from
/proc, `scenarios` measures, and `report` prints the table and writes the JSON and chart.
"""
