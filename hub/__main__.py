from hub.cli.app import app

app(prog_name="hub")
