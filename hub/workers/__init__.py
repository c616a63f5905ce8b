"""`hub serve --workers N`: a supervisor process and N worker processes on one port.

* `slots`: who a worker is (its slot, node id, directory), as the supervisor tells it;
* `policy`: the supervisor's decisions, pure: restart backoff, liveness, readiness;
* `exposition`: the workers' /metrics merged with a `worker` label, their /healthz combined;
* `relay`: the notification sockets the workers report READY=1 and WATCHDOG=1 on;
* `ports`: the device port they share (systemd's sockets, or SO_REUSEPORT);
* `claims`: the device claims of a worker that died, released as it is reaped;
* `supervisor`: the processes, signals and systemd notifications;
* `health`: the supervisor's /healthz and /metrics listener.
"""
