"""`device-sim chaos`: a fleet across several hubs while hubs, PostgreSQL and InfluxDB fail.

* `plan`: which faults, in which order, how long each lasts (pure, seeded).
* `memory`: each hub process's RSS over time and whether it stayed flat (pure).
* `fleet`: the simulated devices, their connection times, takeovers and config pushes.
* `faults`: doing one fault to the real servers and undoing it.
* `environment`: starting every server and stopping each by its process id.
* `verify`: whether InfluxDB holds every acked reading.
* `watch`: RSS and load sampled while it runs, and the progress line.
* `report`: the checks and figures of a finished run.
* `run`: the whole run, its progress lines and its JSON report.
"""
