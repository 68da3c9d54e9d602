"""The stream processor: the faust app (app.py) calls the roles (roles/), built by build_process (process.py) and steered by control commands (control.py)."""
