from device_sim.cli import app

app(prog_name="device-sim")
